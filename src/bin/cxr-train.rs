//! cxr-train: trains one DenseNet variant and exports it for cxr-serve.
//! See `cxr-train --help` and README.md ("Training").

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cxr::train::TrainArgs::parse();
    match cxr::train::run(&args)? {
        Some(out) => println!("{}", out.onnx.display()),
        None => eprintln!(
            "cxr-train: stopped early (--stop-after-steps); run again with --resume to continue"
        ),
    }
    Ok(())
}
