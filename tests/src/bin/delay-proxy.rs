//! `delay-proxy LISTEN TARGET DELAY_MS`: relays TCP connections from LISTEN
//! to TARGET, DELAY_MS late in each direction (a cross-site link for tests
//! and benchmarks; this kernel has no `tc netem`). Prints `listening on
//! ADDR` once ready and runs until killed.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use mirrorblk_tests::proxy::DelayProxy;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: delay-proxy LISTEN_ADDR TARGET_ADDR DELAY_MS (e.g. 127.0.0.1:0 127.0.0.1:10810 5)";
    let [listen, target, delay] = args.as_slice() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let parse = |s: &str| -> Result<SocketAddr, String> {
        s.parse()
            .map_err(|e| format!("delay-proxy: '{s}' is not HOST:PORT: {e}"))
    };
    let (listen, target) = match (parse(listen), parse(target)) {
        (Ok(l), Ok(t)) => (l, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    let Ok(ms) = delay.parse::<u64>() else {
        eprintln!("delay-proxy: DELAY_MS '{delay}' is not a whole number of milliseconds\n{usage}");
        return ExitCode::from(2);
    };
    match DelayProxy::start(listen, target, Duration::from_millis(ms)) {
        Ok(p) => {
            eprintln!("listening on {}", p.addr());
            p.run_forever()
        }
        Err(e) => {
            eprintln!("delay-proxy: cannot listen on {listen}: {e}");
            ExitCode::from(1)
        }
    }
}
