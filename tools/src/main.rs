//! `mirrorblk`: the admin CLI (grows with the admin socket).
fn main() {
    println!("mirrorblk {}", env!("CARGO_PKG_VERSION"));
}
