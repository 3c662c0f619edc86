//! The KV guest served over the VM's own netstack, in process: an independent TCP client
//! (smoltcp) exchanges Ethernet frames with the VM through the gate, speaks RESP to it, and the
//! recorded session is then replayed: the replay must emit exactly the same frames.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use ftvm_log::{ControlOp, Limits, NicSpec, VmSpec};
use ftvm_vm::gate::{Output, OutputPort};
use ftvm_vm::logfile::{FileSink, FileSource};
use ftvm_vm::{Gate, Vm, VmError, VmImage, VmOutcome, World};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

const VM_MAC: [u8; 6] = [0x02, 0xf7, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x02];

fn kv_guest() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/build/kv.wasm");
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        p.display()
    );
    p
}

fn image() -> VmImage {
    let bytes = std::fs::read(kv_guest()).unwrap();
    VmImage {
        name: "kv.wasm".into(),
        module_bytes: bytes,
        spec: VmSpec {
            args: vec!["kv.wasm".into()],
            env: vec![],
            preopens: vec![],
            listeners: vec![6379],
            nic: Some(NicSpec {
                mac: VM_MAC,
                ip: [198, 18, 0, 1],
                prefix_len: 24,
                gateway: None,
                seed: 42,
            }),
            limits: Limits::default(),
        },
        dirs: vec![],
    }
}

/// Collects the VM's outputs (frames go to the client too).
#[derive(Clone)]
struct Port {
    frames: Option<Sender<Vec<u8>>>,
    log: Arc<Mutex<Vec<Output>>>,
}

impl OutputPort for Port {
    fn emit(&mut self, output: Output, _seq: u64) -> Result<(), VmError> {
        if let (Output::Frame(f), Some(tx)) = (&output, &self.frames) {
            let _ = tx.send(f.clone());
        }
        self.log.lock().unwrap().push(output);
        Ok(())
    }
}

#[derive(Default)]
struct Dev {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}
struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut Vec<Vec<u8>>);
impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}
impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}
impl Device for Dev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        let b = self.rx.pop_front()?;
        Some((Rx(b), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// A RESP client over smoltcp, driven in real time against the VM thread.
struct Client {
    dev: Dev,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    start: StdInstant,
    to_vm: Sender<Vec<u8>>,
    from_vm: Receiver<Vec<u8>>,
}

impl Client {
    fn new(to_vm: Sender<Vec<u8>>, from_vm: Receiver<Vec<u8>>) -> Client {
        let mut dev = Dev::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(CLIENT_MAC)));
        config.random_seed = 7;
        let start = StdInstant::now();
        let mut iface = Interface::new(config, &mut dev, Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(198, 18, 0, 2), 24))
                .unwrap()
        });
        let mut sockets = SocketSet::new(Vec::new());
        let sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        let handle = sockets.add(sock);
        sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(iface.context(), (IpAddress::v4(198, 18, 0, 1), 6379), 40000)
            .unwrap();
        Client {
            dev,
            iface,
            sockets,
            handle,
            start,
            to_vm,
            from_vm,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn pump(&mut self) {
        while let Ok(f) = self.from_vm.try_recv() {
            self.dev.rx.push_back(f);
        }
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        for f in self.dev.tx.drain(..) {
            let _ = self.to_vm.send(f);
        }
    }

    /// Sends a request and waits (bounded) until `want` bytes of reply arrived.
    fn request(&mut self, req: &[u8], reply_len: usize) -> Vec<u8> {
        let deadline = StdInstant::now() + Duration::from_secs(10);
        let mut sent = 0;
        let mut got = Vec::new();
        while got.len() < reply_len {
            assert!(
                StdInstant::now() < deadline,
                "no full reply to {:?}; got {:?}",
                String::from_utf8_lossy(req),
                String::from_utf8_lossy(&got)
            );
            self.pump();
            let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
            if s.can_send() && sent < req.len() {
                sent += s.send_slice(&req[sent..]).unwrap();
            }
            let mut buf = [0u8; 4096];
            while s.can_recv() {
                let n = s.recv_slice(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            self.pump();
            std::thread::sleep(Duration::from_micros(200));
        }
        got
    }
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    out.into_bytes()
}

#[test]
fn kv_guest_serves_resp_over_the_vm_netstack_and_the_session_replays_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("kv.log");
    let image = image();
    let (to_vm, frames_in) = unbounded::<Vec<u8>>();
    let (frames_out, from_vm) = unbounded::<Vec<u8>>();
    let (control_tx, control_rx) = unbounded::<ControlOp>();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let port = Port {
        frames: Some(frames_out),
        log: recorded.clone(),
    };
    let header = image.header().unwrap();
    let sink = FileSink::create(&log, &header).unwrap();
    let vm_thread = std::thread::spawn(move || {
        let gate = Gate::record(
            Box::new(sink),
            World::new(
                Some(ftvm_vm::gate::ChannelFrames::boxed(frames_in)),
                Some(control_rx),
            ),
            Box::new(port),
            256,
        );
        let mut vm = Vm::boot(&image, gate).unwrap();
        vm.run()
    });

    let mut client = Client::new(to_vm, from_vm);
    assert_eq!(client.request(&resp(&["PING"]), 7), b"+PONG\r\n");
    assert_eq!(
        client.request(&resp(&["SET", "greeting", "hello"]), 5),
        b"+OK\r\n"
    );
    assert_eq!(
        client.request(&resp(&["GET", "greeting"]), 11),
        b"$5\r\nhello\r\n"
    );
    for i in 1..=20 {
        let want = format!(":{i}\r\n");
        assert_eq!(
            client.request(&resp(&["INCR", "n"]), want.len()),
            want.as_bytes()
        );
    }
    // Pipelining: three requests in one write.
    let mut pipe = resp(&["INCR", "n"]);
    pipe.extend(resp(&["DEL", "greeting"]));
    pipe.extend(resp(&["EXISTS", "greeting"]));
    assert_eq!(client.request(&pipe, 13), b":21\r\n:1\r\n:0\r\n");
    control_tx.send(ControlOp::PowerOff).unwrap();
    let outcome = vm_thread.join().unwrap().unwrap();
    assert_eq!(outcome, VmOutcome::PoweredOff);

    // Replay the recorded session: the same frames, in the same order, byte for byte.
    let image = self::image();
    let source = FileSource::open(&log).unwrap();
    image.check_log_header(source.header()).unwrap();
    let replayed = Arc::new(Mutex::new(Vec::new()));
    let port = Port {
        frames: None,
        log: replayed.clone(),
    };
    let mut gate = Gate::replay(Box::new(source), None, Box::new(port), 256);
    let pcap = dir.path().join("replay.pcap");
    let file = std::fs::File::create(&pcap).unwrap();
    gate.set_capture(ftvm_vm::pcap::Capture::new(Box::new(file)).unwrap());
    let mut vm = Vm::boot(&image, gate).unwrap();
    assert_eq!(vm.run().unwrap(), VmOutcome::PoweredOff);
    drop(vm);
    check_capture(&std::fs::read(&pcap).unwrap(), &recorded.lock().unwrap());
    let a = recorded.lock().unwrap();
    let b = replayed.lock().unwrap();
    let frames = a.iter().filter(|o| matches!(o, Output::Frame(_))).count();
    // At least the SYN-ACK and one reply per request (24 of them); ACKs ride on the replies.
    assert!(frames > 24, "the session produced frames ({frames})");
    assert_eq!(
        a.len(),
        b.len(),
        "replay emitted a different number of outputs"
    );
    assert!(*a == *b, "replay emitted different outputs");
}

/// The replay's packet capture: a pcap file whose outbound frames (source MAC = the VM's) are the
/// recorded run's frame outputs in order, with inbound frames between them and virtual
/// timestamps that never go back.
fn check_capture(pcap: &[u8], recorded: &[Output]) {
    assert_eq!(&pcap[..4], &0xa1b2_c3d4u32.to_le_bytes(), "pcap magic");
    assert_eq!(
        u32::from_le_bytes(pcap[20..24].try_into().unwrap()),
        1,
        "Ethernet"
    );
    let vm_mac = image().spec.nic.as_ref().unwrap().mac;
    let (mut at, mut last_us, mut inbound) = (24, 0u64, 0);
    let mut outbound = Vec::new();
    while at < pcap.len() {
        let word = |o: usize| u32::from_le_bytes(pcap[at + o..at + o + 4].try_into().unwrap());
        let us = u64::from(word(0)) * 1_000_000 + u64::from(word(4));
        let (kept, len) = (word(8) as usize, word(12) as usize);
        assert_eq!(kept, len, "no frame is cut");
        assert!(us >= last_us, "virtual time never goes back in the capture");
        last_us = us;
        let frame = &pcap[at + 16..at + 16 + kept];
        if &frame[6..12] == vm_mac.as_slice() {
            outbound.push(frame.to_vec());
        } else {
            inbound += 1;
        }
        at += 16 + kept;
    }
    assert_eq!(at, pcap.len(), "the capture ends on a record boundary");
    let frames: Vec<Vec<u8>> = recorded
        .iter()
        .filter_map(|o| match o {
            Output::Frame(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        outbound, frames,
        "the capture shows the recorded run's frames"
    );
    assert!(
        inbound > 20,
        "the client's frames are in the capture ({inbound})"
    );
}
