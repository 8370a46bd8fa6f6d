//! The `rvscsi-sim` command (see `rvscsi-sim` without arguments).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = rvscsi_sim::cli::run(&args, &mut std::io::stdout(), &mut std::io::stderr());
    std::process::exit(code);
}
