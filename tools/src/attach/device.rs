//! The kernel's nbd driver through its generic netlink family "nbd"
//! (`include/uapi/linux/nbd-netlink.h`, `drivers/block/nbd.c`).
//!
//! - [`Nbd::connect`]: `NBD_CMD_CONNECT` configures `/dev/nbdN` with the
//!   export's size, block size and transmission flags, the I/O timeout
//!   (`NBD_ATTR_TIMEOUT`: a request unanswered that long marks its socket
//!   dead and is requeued) and the dead-connection timeout
//!   (`NBD_ATTR_DEAD_CONN_TIMEOUT`: how long requests wait for a new socket
//!   before the kernel fails them with EIO), and hands it the sockets.
//! - [`Nbd::reconfigure`]: `NBD_CMD_RECONFIGURE` replaces dead sockets with
//!   fresh ones; the kernel then resends what was waiting.
//! - [`Nbd::disconnect`], [`Nbd::status`].
//! - [`link_dead`]: the `NBD_CMD_LINK_DEAD` notification the kernel
//!   multicasts on "nbd_mc_group" when it marks a socket dead.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use super::netlink::{parse_attrs, Family, Message, Received, Socket};

/// `NBD_GENL_FAMILY_NAME`.
pub const FAMILY: &str = "nbd";
/// `NBD_GENL_MCAST_GROUP_NAME`.
pub const MCAST_GROUP: &str = "nbd_mc_group";
const VERSION: u8 = 1;

const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_DEVICE_LIST: u16 = 9;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
const DEVICE_ITEM: u16 = 1;
const DEVICE_INDEX: u16 = 1;
const DEVICE_CONNECTED: u16 = 2;

const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const CMD_LINK_DEAD: u8 = 4;
const CMD_STATUS: u8 = 5;

/// What the kernel refused, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// No generic netlink family "nbd": the module is not loaded.
    #[error("the kernel's nbd driver is not loaded: run `modprobe nbd` (as root), then try again")]
    NoDriver,
    /// `/dev/nbdN` could not be parsed.
    #[error("'{0}' is not an nbd device: give /dev/nbdN (N a number)")]
    NotNbd(String),
    /// The kernel said the device is already configured.
    #[error("/dev/nbd{0} is already attached (by nbd-client or another mirrorblk attach): `mirrorblk detach /dev/nbd{0}` first, or choose another device")]
    Busy(u32),
    /// Netlink needs CAP_SYS_ADMIN.
    #[error("{op} /dev/nbd{index} was refused: it needs root (CAP_SYS_ADMIN)")]
    Permission {
        /// The request.
        op: &'static str,
        /// The device.
        index: u32,
    },
    /// Any other refusal or socket error.
    #[error("{op} /dev/nbd{index} failed: {source} (the kernel log, dmesg, says more)")]
    Kernel {
        /// The request.
        op: &'static str,
        /// The device.
        index: u32,
        /// The errno.
        source: io::Error,
    },
    /// The netlink socket itself failed.
    #[error("generic netlink: {0}")]
    Netlink(#[source] io::Error),
}

/// `/dev/nbdN` (or `nbdN`) -> N.
pub fn parse_device(dev: &Path) -> Result<u32, DeviceError> {
    let s = dev.to_string_lossy();
    let name = s.strip_prefix("/dev/").unwrap_or(&s);
    name.strip_prefix("nbd")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| DeviceError::NotNbd(s.into_owned()))
}

/// How the device is configured at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// N of /dev/nbdN.
    pub index: u32,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size (512..=4096, a power of two).
    pub block_size: u64,
    /// NBD transmission flags the server sent.
    pub server_flags: u16,
    /// I/O timeout, seconds.
    pub io_timeout: u64,
    /// Dead-connection timeout, seconds.
    pub dead_conn_timeout: u64,
}

fn sockets(m: &mut Message, fds: &[RawFd]) {
    m.nest(ATTR_SOCKETS);
    for &fd in fds {
        let fd = u32::try_from(fd).expect("file descriptors are not negative");
        m.nest(SOCK_ITEM).u32(SOCK_FD, fd).end_nest();
    }
    m.end_nest();
}

/// The `NBD_CMD_CONNECT` request for `cfg` and sockets `fds`.
pub fn connect_message(family: u16, cfg: &DeviceConfig, fds: &[RawFd]) -> Message {
    assert!(!fds.is_empty(), "connect needs at least one socket");
    let mut m = Message::new(family, CMD_CONNECT, VERSION);
    m.u32(ATTR_INDEX, cfg.index)
        .u64(ATTR_SIZE_BYTES, cfg.size)
        .u64(ATTR_BLOCK_SIZE_BYTES, cfg.block_size)
        .u64(ATTR_SERVER_FLAGS, u64::from(cfg.server_flags))
        .u64(ATTR_TIMEOUT, cfg.io_timeout)
        .u64(ATTR_DEAD_CONN_TIMEOUT, cfg.dead_conn_timeout);
    sockets(&mut m, fds);
    m
}

/// The `NBD_CMD_RECONFIGURE` request handing device `index` new sockets
/// and, when the export's size changed (a resize), its new size.
pub fn reconfigure_message(family: u16, index: u32, fds: &[RawFd], size: Option<u64>) -> Message {
    assert!(!fds.is_empty(), "reconfigure needs at least one socket");
    let mut m = Message::new(family, CMD_RECONFIGURE, VERSION);
    m.u32(ATTR_INDEX, index);
    if let Some(size) = size {
        m.u64(ATTR_SIZE_BYTES, size);
    }
    sockets(&mut m, fds);
    m
}

/// The `NBD_CMD_RECONFIGURE` request giving device `index` a new size and
/// nothing else: the kernel (`nbd_genl_size_set`) updates the capacity and
/// tells user space (a udev change event), the connection stays.
pub fn resize_message(family: u16, index: u32, size: u64) -> Message {
    assert!(size > 0, "a device is resized to a size");
    let mut m = Message::new(family, CMD_RECONFIGURE, VERSION);
    m.u32(ATTR_INDEX, index).u64(ATTR_SIZE_BYTES, size);
    m
}

/// The device a `NBD_CMD_LINK_DEAD` notification names, if `msg` is one
/// from `family`.
pub fn link_dead(family: u16, msg: &Received) -> Option<u32> {
    match msg {
        Received::Genl {
            family: f,
            cmd: CMD_LINK_DEAD,
            attrs,
            ..
        } if *f == family => parse_attrs(attrs)
            .ok()?
            .iter()
            .find(|a| a.kind == ATTR_INDEX)
            .and_then(|a| a.u32().ok()),
        _ => None,
    }
}

/// Whether the `NBD_CMD_STATUS` answer `attrs` says device `index` is
/// configured (Some(true)), exists unconfigured (Some(false)) or is not
/// listed (None).
pub fn decode_status(attrs: &[u8], index: u32) -> Option<bool> {
    let list = parse_attrs(attrs).ok()?;
    let devices = list.iter().find(|a| a.kind == ATTR_DEVICE_LIST)?;
    for item in devices.nested().ok()? {
        if item.kind != DEVICE_ITEM {
            continue;
        }
        let fields = item.nested().ok()?;
        let idx = fields
            .iter()
            .find(|f| f.kind == DEVICE_INDEX)
            .and_then(|f| f.u32().ok());
        if idx == Some(index) {
            let connected = fields
                .iter()
                .find(|f| f.kind == DEVICE_CONNECTED)
                .and_then(|f| f.u8().ok());
            return Some(connected.unwrap_or(0) != 0);
        }
    }
    None
}

/// A netlink socket bound to the nbd family.
#[derive(Debug)]
pub struct Nbd {
    sock: Socket,
    family: Family,
}

impl Nbd {
    /// Opens a socket and resolves the family; [`DeviceError::NoDriver`]
    /// when the nbd module is not loaded.
    pub fn open() -> Result<Nbd, DeviceError> {
        let mut sock = Socket::open().map_err(DeviceError::Netlink)?;
        // A kernel that never answers must not hang attach or detach.
        sock.set_timeout(Some(std::time::Duration::from_secs(30)))
            .map_err(DeviceError::Netlink)?;
        let family = sock
            .resolve(FAMILY)
            .map_err(DeviceError::Netlink)?
            .ok_or(DeviceError::NoDriver)?;
        Ok(Nbd { sock, family })
    }

    /// The family id (the `nlmsg_type` of its messages).
    pub fn family_id(&self) -> u16 {
        self.family.id
    }

    /// A new socket joined to the family's multicast group, for
    /// `NBD_CMD_LINK_DEAD` notifications.
    pub fn subscribe(&self) -> Result<Socket, DeviceError> {
        let group = self
            .family
            .groups
            .iter()
            .find(|(n, _)| n == MCAST_GROUP)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                DeviceError::Netlink(io::Error::other(format!(
                    "the nbd family has no multicast group {MCAST_GROUP}"
                )))
            })?;
        let s = Socket::open().map_err(DeviceError::Netlink)?;
        s.join(group).map_err(DeviceError::Netlink)?;
        Ok(s)
    }

    fn call(
        &mut self,
        op: &'static str,
        index: u32,
        m: &Message,
    ) -> Result<Vec<Received>, DeviceError> {
        self.sock.request(m).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => DeviceError::Permission { op, index },
            Some(libc::EBUSY) if op == "attaching" => DeviceError::Busy(index),
            _ => DeviceError::Kernel {
                op,
                index,
                source: e,
            },
        })
    }

    /// `NBD_CMD_CONNECT`.
    pub fn connect(&mut self, cfg: &DeviceConfig, fds: &[RawFd]) -> Result<(), DeviceError> {
        let m = connect_message(self.family.id, cfg, fds);
        self.call("attaching", cfg.index, &m).map(drop)
    }

    /// `NBD_CMD_RECONFIGURE` with new sockets (the kernel replaces dead
    /// ones; with none dead it drops them) and, with `size`, a new size.
    pub fn reconfigure(
        &mut self,
        index: u32,
        fds: &[RawFd],
        size: Option<u64>,
    ) -> Result<(), DeviceError> {
        let m = reconfigure_message(self.family.id, index, fds, size);
        self.call("reconfiguring", index, &m).map(drop)
    }

    /// `NBD_CMD_RECONFIGURE` with only a new size.
    pub fn resize(&mut self, index: u32, size: u64) -> Result<(), DeviceError> {
        let m = resize_message(self.family.id, index, size);
        self.call("resizing", index, &m).map(drop)
    }

    /// `NBD_CMD_DISCONNECT`.
    pub fn disconnect(&mut self, index: u32) -> Result<(), DeviceError> {
        let mut m = Message::new(self.family.id, CMD_DISCONNECT, VERSION);
        m.u32(ATTR_INDEX, index);
        self.call("detaching", index, &m).map(drop)
    }

    /// `NBD_CMD_STATUS` of one device: Some(configured), None if the kernel
    /// has no such device.
    pub fn status(&mut self, index: u32) -> Result<Option<bool>, DeviceError> {
        let mut m = Message::new(self.family.id, CMD_STATUS, VERSION);
        m.u32(ATTR_INDEX, index);
        let answers = self.call("querying", index, &m)?;
        Ok(answers.iter().find_map(|a| match a {
            Received::Genl { attrs, .. } => decode_status(attrs, index),
            _ => None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::netlink::{parse_messages, NLA_F_NESTED};

    #[test]
    fn device_names_parse() {
        assert_eq!(parse_device(Path::new("/dev/nbd0")).unwrap(), 0);
        assert_eq!(parse_device(Path::new("/dev/nbd15")).unwrap(), 15);
        assert_eq!(parse_device(Path::new("nbd3")).unwrap(), 3);
        for bad in ["/dev/sda", "/dev/nbd", "/dev/nbd0p1", "/dev/nbd-1", ""] {
            assert!(parse_device(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn connect_carries_every_attribute_and_socket() {
        let cfg = DeviceConfig {
            index: 2,
            size: 64 << 20,
            block_size: 4096,
            server_flags: 0x1ed,
            io_timeout: 10,
            dead_conn_timeout: 120,
        };
        let b = connect_message(0x21, &cfg, &[5, 6]).finish(3);
        let msgs = parse_messages(&b).unwrap();
        let Received::Genl {
            family, cmd, attrs, ..
        } = &msgs[0]
        else {
            panic!("{msgs:?}")
        };
        assert_eq!((*family, *cmd), (0x21, CMD_CONNECT));
        let a = parse_attrs(attrs).unwrap();
        let get = |k: u16| a.iter().find(|x| x.kind == k).unwrap().payload.to_vec();
        assert_eq!(get(ATTR_INDEX), 2u32.to_ne_bytes());
        assert_eq!(get(ATTR_SIZE_BYTES), (64u64 << 20).to_ne_bytes());
        assert_eq!(get(ATTR_BLOCK_SIZE_BYTES), 4096u64.to_ne_bytes());
        assert_eq!(get(ATTR_SERVER_FLAGS), 0x1edu64.to_ne_bytes());
        assert_eq!(get(ATTR_TIMEOUT), 10u64.to_ne_bytes());
        assert_eq!(get(ATTR_DEAD_CONN_TIMEOUT), 120u64.to_ne_bytes());
        let socks = a
            .iter()
            .find(|x| x.kind == ATTR_SOCKETS)
            .unwrap()
            .nested()
            .unwrap();
        let fds: Vec<u32> = socks
            .iter()
            .map(|item| {
                assert_eq!(item.kind, SOCK_ITEM);
                item.nested().unwrap()[0].u32().unwrap()
            })
            .collect();
        assert_eq!(fds, vec![5, 6]);
    }

    #[test]
    fn reconfigure_names_the_device_and_sockets_only() {
        let kinds = |m: &Message| {
            let Received::Genl { cmd, attrs, .. } = genl(m) else {
                panic!()
            };
            assert_eq!(cmd, CMD_RECONFIGURE);
            let attrs = parse_attrs(&attrs).unwrap();
            let size = attrs
                .iter()
                .find(|a| a.kind == ATTR_SIZE_BYTES)
                .map(|a| a.payload.to_vec());
            (attrs.iter().map(|a| a.kind).collect::<Vec<u16>>(), size)
        };
        let (plain, size) = kinds(&reconfigure_message(0x21, 7, &[9], None));
        assert_eq!(plain, vec![ATTR_INDEX, ATTR_SOCKETS]);
        assert_eq!(size, None);
        // After a resize while disconnected: the new size goes with the socket.
        let (resized, size) = kinds(&reconfigure_message(0x21, 7, &[9], Some(1 << 30)));
        assert_eq!(resized, vec![ATTR_INDEX, ATTR_SIZE_BYTES, ATTR_SOCKETS]);
        assert_eq!(size, Some((1u64 << 30).to_ne_bytes().to_vec()));
        // A resize alone touches no socket.
        let (only, size) = kinds(&resize_message(0x21, 7, 3 << 20));
        assert_eq!(only, vec![ATTR_INDEX, ATTR_SIZE_BYTES]);
        assert_eq!(size, Some((3u64 << 20).to_ne_bytes().to_vec()));
    }

    fn genl(m: &Message) -> Received {
        parse_messages(&m.finish(0)).unwrap().remove(0)
    }

    #[test]
    fn link_dead_is_recognised_for_its_family_only() {
        let mut m = Message::new(0x21, CMD_LINK_DEAD, 1);
        m.u32(ATTR_INDEX, 4);
        let r = genl(&m);
        assert_eq!(link_dead(0x21, &r), Some(4));
        assert_eq!(link_dead(0x22, &r), None);
        let mut other = Message::new(0x21, CMD_STATUS, 1);
        other.u32(ATTR_INDEX, 4);
        assert_eq!(link_dead(0x21, &genl(&other)), None);
    }

    #[test]
    fn status_answer_decodes() {
        // As the kernel builds it: the list nest without NLA_F_NESTED.
        let mut m = Message::new(0x21, CMD_STATUS, 1);
        m.nest(ATTR_DEVICE_LIST)
            .nest(DEVICE_ITEM)
            .u32(DEVICE_INDEX, 0)
            .end_nest()
            .nest(DEVICE_ITEM)
            .u32(DEVICE_INDEX, 3)
            .u8(DEVICE_CONNECTED, 1)
            .end_nest()
            .end_nest();
        let Received::Genl { mut attrs, .. } = genl(&m) else {
            panic!()
        };
        // Clear the nested flag of the outer list: both forms must parse.
        attrs[3] &= !((NLA_F_NESTED >> 8) as u8);
        assert_eq!(decode_status(&attrs, 0), Some(false));
        assert_eq!(decode_status(&attrs, 9), None);
        assert_eq!(decode_status(&attrs, 3), Some(true));
    }
}
