//! Two network namespaces joined by a veth pair, made by the test that uses
//! them and deleted (with the pair) when dropped: one side for a node to
//! isolate, the other for everything it must lose, so setting the isolated
//! end down is a partition and up again its heal.
//!
//! Addresses are only ever assigned inside those two private namespaces.
//! Where they cannot be created (no root, no iproute2), [`Net::create`]
//! says why, and the test prints `SKIP:` with it.

use std::process::Command;

/// Runs `ip ARGS…`; the error output if it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The isolated side's address.
pub const PRIMARY_IP: &str = "10.231.0.1";
/// The other side's address.
pub const REPLICA_IP: &str = "10.231.0.2";

/// Two namespaces joined by a veth pair; deleted (with the pair) on drop.
#[derive(Debug)]
pub struct Net {
    /// The isolated side (at [`PRIMARY_IP`]).
    pub primary_ns: String,
    /// The other side (at [`REPLICA_IP`]).
    pub replica_ns: String,
    primary_if: String,
}

impl Net {
    /// Creates both namespaces (named after this process and `tag`, one
    /// letter, so tests of one process can each have theirs), the pair and
    /// the addresses, and brings every link up.
    pub fn create(tag: &str) -> Result<Net, String> {
        let id = std::process::id();
        let net = Net {
            primary_ns: format!("mbk{id}{tag}p"),
            replica_ns: format!("mbk{id}{tag}r"),
            primary_if: format!("mbp{id}{tag}"),
        };
        let replica_if = format!("mbr{id}{tag}");
        ip(&["netns", "add", &net.primary_ns])?;
        ip(&["netns", "add", &net.replica_ns])?;
        let (p, r) = (net.primary_ns.as_str(), net.replica_ns.as_str());
        let pif = net.primary_if.as_str();
        ip(&[
            "-n",
            p,
            "link",
            "add",
            pif,
            "type",
            "veth",
            "peer",
            "name",
            &replica_if,
            "netns",
            r,
        ])?;
        ip(&[
            "-n",
            p,
            "addr",
            "add",
            &format!("{PRIMARY_IP}/30"),
            "dev",
            pif,
        ])?;
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("{REPLICA_IP}/30"),
            "dev",
            &replica_if,
        ])?;
        for (ns, dev) in [(p, pif), (r, replica_if.as_str())] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(net)
    }

    /// Sets the isolated end up (heal) or down (partition).
    #[track_caller]
    pub fn set_link(&self, up: bool) {
        ip(&[
            "-n",
            &self.primary_ns,
            "link",
            "set",
            &self.primary_if,
            if up { "up" } else { "down" },
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth pair too.
        let _ = ip(&["netns", "del", &self.primary_ns]);
        let _ = ip(&["netns", "del", &self.replica_ns]);
    }
}
