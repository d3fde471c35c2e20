//! A raw HTTP/2 client for abuse tests: it writes frames as given (ignoring the server's
//! settings and flow control where a test wants that) and reads frames as they come, so tests
//! can send what no well-behaved client would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS identifiers (RFC 9113 6.5.2).
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// One frame as read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The (identifier, value) pairs of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|entry| {
                (u16::from_be_bytes([entry[0], entry[1]]), u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
            })
            .collect()
    }
}

/// What reading the next frame found.
#[derive(Debug)]
pub enum Read {
    Frame(Frame),
    /// The server closed the connection.
    Closed,
    /// Nothing arrived in time.
    Silent,
}

/// A connection that speaks HTTP/2 frame by frame.
pub struct RawH2 {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

impl RawH2 {
    /// Connects and sends the client preface and an empty SETTINGS frame.
    pub async fn connect(address: SocketAddr) -> Self {
        let mut connection = Self::tcp(address).await;
        connection.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        connection.send(SETTINGS, 0, 0, &[]).await;
        connection
    }

    /// [`connect`](Self::connect) from the local address `from` (any of 127.0.0.0/8 reaches
    /// a server on 127.0.0.1: a client at another address).
    pub async fn connect_from(address: SocketAddr, from: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = socket.connect(address).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        let mut connection = Self { reader: FrameReader::new(reader), writer };
        connection.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        connection.send(SETTINGS, 0, 0, &[]).await;
        connection
    }

    /// Connects without saying anything.
    pub async fn tcp(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let (reader, writer) = stream.into_split();
        Self { reader: FrameReader::new(reader), writer }
    }

    /// Writes raw bytes; false once the server has closed the connection.
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).await.is_ok()
    }

    /// Writes one frame; false once the server has closed the connection.
    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> bool {
        self.write(&frame(kind, flags, stream, payload)).await
    }

    /// Opens a stream to `path` with `extra` headers (END_STREAM when `end_stream`).
    pub async fn open(&mut self, stream: u32, path: &str, extra: &[(&str, &str)], end_stream: bool) -> bool {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, &header_block(path, extra)).await
    }

    pub async fn read_until(
        &mut self,
        wait: Duration,
        seen: &mut Vec<Frame>,
        wanted: impl Fn(&Frame) -> bool,
    ) -> Option<Frame> {
        self.reader.read_until(wait, seen, wanted).await
    }

    pub async fn closed_within(&mut self, wait: Duration, seen: &mut Vec<Frame>) -> bool {
        self.reader.closed_within(wait, seen).await
    }
}

/// Reads frames off a connection.
pub struct FrameReader<R> {
    stream: R,
    buffer: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(stream: R) -> Self {
        Self { stream, buffer: Vec::new() }
    }

    /// The next frame within `wait`.
    pub async fn read(&mut self, wait: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buffer.len() >= 9 {
                let length = u32::from_be_bytes([0, self.buffer[0], self.buffer[1], self.buffer[2]]) as usize;
                if self.buffer.len() >= 9 + length {
                    let header: Vec<u8> = self.buffer.drain(..9).collect();
                    let payload = self.buffer.drain(..length).collect();
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                    return Read::Frame(Frame { kind: header[3], flags: header[4], stream, payload });
                }
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Read::Silent,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
                Ok(Ok(read)) => self.buffer.extend_from_slice(&chunk[..read]),
            }
        }
    }

    /// Reads frames until `wanted` matches one (returned), the connection closes or `wait`
    /// passes (`None`). Every frame read goes to `seen`.
    pub async fn read_until(
        &mut self,
        wait: Duration,
        seen: &mut Vec<Frame>,
        wanted: impl Fn(&Frame) -> bool,
    ) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Read::Frame(frame) => {
                    seen.push(frame.clone());
                    if wanted(&frame) {
                        return Some(frame);
                    }
                }
                Read::Closed | Read::Silent => return None,
            }
        }
    }

    /// Reads until the server closes the connection (true) or `wait` passes (false).
    pub async fn closed_within(&mut self, wait: Duration, seen: &mut Vec<Frame>) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                Read::Frame(frame) => seen.push(frame),
                Read::Closed => return true,
                Read::Silent => return false,
            }
        }
    }
}

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut bytes = vec![length[1], length[2], length[3], kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 5.1), first byte's high bits zero.
fn hpack_integer(value: usize, prefix: u32, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128 + 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A gRPC request's header block to `path`, every field a literal without indexing.
pub fn header_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    let base = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "keygate"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    for (name, value) in base.iter().chain(extra) {
        block.push(0);
        hpack_integer(name.len(), 7, &mut block);
        block.extend_from_slice(name.as_bytes());
        hpack_integer(value.len(), 7, &mut block);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// A gRPC message frame (uncompressed) around `message`.
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0];
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(message);
    bytes
}
