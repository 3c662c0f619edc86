//! TEMPORARY stand-in for ftvm-net's API while it is being written. Removed at integration.
#![allow(dead_code, unused_variables)]
#[derive(Debug)]
pub enum NetError { WouldBlock, ConnectionReset, NotConnected, BrokenPipe, InvalidSocket, Other }
#[derive(Clone, Copy, Debug)]
pub struct SocketId(pub u32);
#[derive(Clone, Copy, Debug)]
pub struct ListenerId(pub u32);
pub struct NicConfig { pub mac: [u8; 6], pub ip: [u8; 4], pub prefix_len: u8, pub gateway: Option<[u8; 4]>, pub mtu: u16 }
#[derive(Default)]
pub struct Readiness { pub readable: bool, pub readable_bytes: usize, pub writable: bool, pub hangup: bool, pub error: bool }
pub struct NetStack;
impl NetStack {
    pub fn new(cfg: NicConfig, seed: u64) -> Self { NetStack }
    pub fn listen(&mut self, port: u16, backlog: u32) -> Result<ListenerId, NetError> { Err(NetError::Other) }
    pub fn accept(&mut self, l: ListenerId) -> Result<SocketId, NetError> { Err(NetError::WouldBlock) }
    pub fn recv(&mut self, s: SocketId, buf: &mut [u8], peek: bool) -> Result<usize, NetError> { Err(NetError::WouldBlock) }
    pub fn send(&mut self, s: SocketId, data: &[u8], now_ns: u64) -> Result<usize, NetError> { Err(NetError::WouldBlock) }
    pub fn shutdown(&mut self, s: SocketId, r: bool, w: bool, now_ns: u64) -> Result<(), NetError> { Ok(()) }
    pub fn close(&mut self, s: SocketId, now_ns: u64) {}
    pub fn close_listener(&mut self, l: ListenerId) {}
    pub fn readiness(&self, s: SocketId) -> Readiness { Readiness::default() }
    pub fn listener_ready(&self, l: ListenerId) -> bool { false }
    pub fn receive_frame(&mut self, frame: &[u8], now_ns: u64) {}
    pub fn poll(&mut self, now_ns: u64) {}
    pub fn drain_frames(&mut self) -> impl Iterator<Item = Vec<u8>> + '_ { std::iter::empty() }
    pub fn next_deadline_ns(&self) -> Option<u64> { None }
    pub fn announce(&mut self) {}
    pub fn retransmit_all(&mut self, now_ns: u64) {}
    pub fn state_hash(&self) -> [u8; 32] { [0; 32] }
}
