//! cxr-train: trains one DenseNet variant and exports it for cxr-serve.
//! See `cxr-train --help` and README.md ("Training").

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cxr::train::TrainArgs::parse();
    let out = cxr::train::run(&args)?;
    println!("{}", out.onnx.display());
    Ok(())
}
