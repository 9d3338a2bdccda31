"""PyTorch reference for the training-step benchmark: torchvision-equivalent
DenseNet-161 (2 classes), AdamW, cross-entropy, on random data.

Usage: python bench/train_step.py SIZE BATCH STEPS THREADS  -> prints img/s
"""
import sys, time
import torch, torch.nn as nn, torch.nn.functional as F

class Layer(nn.Module):
    def __init__(s, cin, g, bn):
        super().__init__()
        s.norm1 = nn.BatchNorm2d(cin); s.conv1 = nn.Conv2d(cin, bn * g, 1, bias=False)
        s.norm2 = nn.BatchNorm2d(bn * g); s.conv2 = nn.Conv2d(bn * g, g, 3, padding=1, bias=False)
    def forward(s, feats):
        x = torch.cat(feats, 1)
        return s.conv2(F.relu(s.norm2(s.conv1(F.relu(s.norm1(x))))))

class DenseNet(nn.Module):
    def __init__(s, g=48, blocks=(6, 12, 36, 24), init=96, bn=4, classes=2):
        super().__init__()
        s.conv0 = nn.Conv2d(3, init, 7, 2, 3, bias=False); s.norm0 = nn.BatchNorm2d(init)
        s.blocks = nn.ModuleList(); s.trans = nn.ModuleList(); c = init
        for i, n in enumerate(blocks):
            s.blocks.append(nn.ModuleList([Layer(c + j * g, g, bn) for j in range(n)])); c += n * g
            if i + 1 != len(blocks):
                s.trans.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2))); c //= 2
        s.norm5 = nn.BatchNorm2d(c); s.classifier = nn.Linear(c, classes)
    def forward(s, x):
        x = F.max_pool2d(F.relu(s.norm0(s.conv0(x))), 3, 2, 1)
        for i, block in enumerate(s.blocks):
            feats = [x]
            for layer in block:
                feats.append(layer(feats))
            x = torch.cat(feats, 1)
            if i < len(s.trans):
                x = s.trans[i](x)
        x = F.relu(s.norm5(x))
        return s.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

size, batch, steps, threads = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
torch.manual_seed(0)
m = DenseNet().train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
x = torch.randn(batch, 3, size, size)
y = torch.randint(0, 2, (batch,))
w = torch.tensor([0.74, 0.26])
def step():
    opt.zero_grad(); loss = F.cross_entropy(m(x), y, weight=w, label_smoothing=0.1); loss.backward(); opt.step()
step()  # warm-up
t = time.perf_counter()
for _ in range(steps):
    step()
dt = time.perf_counter() - t
print(f"{batch * steps / dt:.3f}")
