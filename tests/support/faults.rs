//! Store faults that a test switches on and off: SQLite triggers that abort an insert,
//! and, on Azure, an HTTP fault proxy between `bgw` and Azurite.
//!
//! Azurite cannot be made to reject one kind of request with 503 Server Busy, or to respond
//! slowly, as the real service does under load. The proxy mocks those faults: it forwards
//! every request byte for byte, except those that match a rule the test switched on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::TestEnv;

/// A kind of write that a submit makes and that a test can make the store reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Enqueueing a message: an insert into `bgw_queue` on SQLite, a put on Azure.
    QueueWrite,
    /// Storing a new task record in the active table.
    RecordInsert,
    /// Deleting a queue message (Azure only).
    MessageDelete,
    /// Every request to the queue service, which closes the connection without a
    /// response, as a stopped server would (Azure only).
    QueueDown,
}

impl Fault {
    /// Returns the faults of a submit's writes that `env`'s store can have.
    pub fn of_submit(env: &TestEnv) -> Vec<Fault> {
        match env.is_azure() {
            true => vec![Fault::QueueWrite, Fault::QueueDown, Fault::RecordInsert],
            false => vec![Fault::QueueWrite, Fault::RecordInsert],
        }
    }
}

/// Faults of one test environment's store.
pub enum StoreFaults {
    /// Triggers in the environment's SQLite file.
    Sqlite {
        db_path: PathBuf,
        active_table: String,
    },
    /// Rules of a fault proxy that the environment's commands and daemons go through.
    Azure {
        proxy: FaultProxy,
        active_table: String,
        queue: String,
        rules: Mutex<HashMap<Fault, RuleId>>,
    },
}

/// Time the Azure SDK retries a failed request in a test environment with faults, in
/// seconds, so that a rejected request fails within 2 s instead of about 81 s.
pub const TEST_MAX_RETRY_SECS: u64 = 1;

/// Submit visibility timeout of an Azure test environment with faults, in seconds. It is
/// longer than a rejected insert takes with [`TEST_MAX_RETRY_SECS`], so that the submit
/// can still delete its message.
pub const TEST_SUBMIT_VISIBILITY_SECS: u64 = 3;

impl StoreFaults {
    /// Prepares faults for `env`. On Azure this starts a fault proxy, routes the
    /// environment through it, and shortens the submit visibility timeout and the SDK's
    /// retries to [`TEST_SUBMIT_VISIBILITY_SECS`] and [`TEST_MAX_RETRY_SECS`]. Call it
    /// before any `bgw` command of the environment runs.
    pub fn install(env: &mut TestEnv) -> StoreFaults {
        let settings = env.settings();
        let active_table = settings.active_table_name.clone();
        if !env.is_azure() {
            return StoreFaults::Sqlite {
                db_path: settings.sqlite_db_path.clone(),
                active_table,
            };
        }
        let proxy = FaultProxy::start(&env.azure_connection());
        env.route_through(&proxy);
        env.set_store_variable(
            "BGW_AZURE_SUBMIT_VISIBILITY_SECS",
            &TEST_SUBMIT_VISIBILITY_SECS.to_string(),
        );
        env.set_store_variable("BGW_AZURE_MAX_RETRY_SECS", &TEST_MAX_RETRY_SECS.to_string());
        StoreFaults::Azure {
            proxy,
            active_table,
            queue: settings.queue.clone(),
            rules: Mutex::new(HashMap::new()),
        }
    }

    /// Switches a fault on or off. On SQLite the database must exist, so run a `bgw`
    /// command such as `register` first.
    pub fn set(&self, fault: Fault, on: bool) {
        match self {
            StoreFaults::Sqlite {
                db_path,
                active_table,
            } => set_trigger(db_path, active_table, fault, on),
            StoreFaults::Azure {
                proxy,
                active_table,
                queue,
                rules,
            } => {
                let mut rules = rules.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = rules.remove(&fault) {
                    proxy.remove(id);
                }
                if on {
                    let action = match fault {
                        Fault::QueueDown => Action::Disconnect,
                        _ => Action::ServerBusy,
                    };
                    let id = proxy.add(action, azure_matcher(fault, active_table, queue));
                    rules.insert(fault, id);
                }
            }
        }
    }

    /// Returns the texts that the error of a write rejected by `fault` contains.
    pub fn error_texts(&self, fault: Fault) -> Vec<String> {
        match (self, fault) {
            (StoreFaults::Sqlite { .. }, Fault::QueueWrite) => vec![
                "failed to enqueue the message of task".to_owned(),
                QUEUE_FULL.to_owned(),
            ],
            (StoreFaults::Sqlite { active_table, .. }, Fault::RecordInsert) => vec![
                "failed to store the record of task".to_owned(),
                format!("in table {active_table}"),
                TABLE_FULL.to_owned(),
            ],
            (StoreFaults::Azure { queue, .. }, Fault::QueueWrite) => vec![
                format!("failed to put a message on queue {queue}"),
                "HTTP 503 ServerBusy".to_owned(),
            ],
            // A new process fails earlier, at creating the queue, which names it too.
            (StoreFaults::Azure { queue, .. }, Fault::QueueDown) => vec![
                format!("queue {queue}: retry policy expired"),
                "connection closed before message completed".to_owned(),
            ],
            (StoreFaults::Azure { active_table, .. }, Fault::RecordInsert) => vec![
                format!("failed to insert into table {active_table}"),
                "HTTP 503 ServerBusy".to_owned(),
            ],
            (_, fault) => panic!("no error text for {fault:?} on this backend"),
        }
    }

    /// Returns the number of requests the proxy rejected for `fault` while it was on, or
    /// `None` on SQLite, where a trigger counts nothing.
    pub fn rejected(&self, fault: Fault) -> Option<usize> {
        match self {
            StoreFaults::Sqlite { .. } => None,
            StoreFaults::Azure { proxy, rules, .. } => {
                let rules = rules.lock().unwrap_or_else(|e| e.into_inner());
                Some(rules.get(&fault).map_or(0, |id| proxy.hits(*id)))
            }
        }
    }

    /// Returns the fault proxy on Azure.
    pub fn proxy(&self) -> Option<&FaultProxy> {
        match self {
            StoreFaults::Sqlite { .. } => None,
            StoreFaults::Azure { proxy, .. } => Some(proxy),
        }
    }
}

/// Message of the trigger that rejects every insert into the queue table.
const QUEUE_FULL: &str = "queue full: a test trigger rejects every insert into bgw_queue";

/// Message of the trigger that rejects every insert into the active task table.
const TABLE_FULL: &str = "table full: a test trigger rejects every insert of a task record";

/// Creates or drops the trigger of a fault in the SQLite file. `RAISE(ABORT, ...)` makes
/// the insert, and so the submit's transaction, fail as a full disk would.
fn set_trigger(db_path: &std::path::Path, active_table: &str, fault: Fault, on: bool) {
    let (name, table, message) = match fault {
        Fault::QueueWrite => ("bgw_test_queue_full", "bgw_queue", QUEUE_FULL),
        Fault::RecordInsert => ("bgw_test_table_full", active_table, TABLE_FULL),
        Fault::MessageDelete | Fault::QueueDown => {
            panic!("{fault:?} is a fault of Azure only")
        }
    };
    let sql = match on {
        true => format!(
            "CREATE TRIGGER IF NOT EXISTS {name} BEFORE INSERT ON {table}
             BEGIN SELECT RAISE(ABORT, '{message}'); END;"
        ),
        false => format!("DROP TRIGGER IF EXISTS {name};"),
    };
    let connection = rusqlite::Connection::open(db_path)
        .unwrap_or_else(|error| panic!("failed to open {}: {error}", db_path.display()));
    connection
        .busy_timeout(Duration::from_secs(10))
        .expect("failed to set the busy timeout");
    connection
        .execute_batch(&sql)
        .unwrap_or_else(|error| panic!("failed to run {sql:?}: {error}"));
}

/// Builds the rule that matches the requests of a fault on Azure.
fn azure_matcher(fault: Fault, active_table: &str, queue: &str) -> Matcher {
    let messages = format!("/{queue}/messages");
    let table = format!("/{active_table}");
    match fault {
        // Put Message: POST to the queue's messages.
        Fault::QueueWrite => Box::new(move |request: &Request| {
            request.service == Service::Queue
                && request.method == "POST"
                && request.path.ends_with(&messages)
        }),
        // Insert Entity: POST to the table itself.
        Fault::RecordInsert => Box::new(move |request: &Request| {
            request.service == Service::Table
                && request.method == "POST"
                && request.path.ends_with(&table)
        }),
        // Delete Message: DELETE of one message.
        Fault::MessageDelete => Box::new(move |request: &Request| {
            request.service == Service::Queue
                && request.method == "DELETE"
                && request.path.contains(&format!("{messages}/"))
        }),
        Fault::QueueDown => Box::new(|request: &Request| request.service == Service::Queue),
    }
}

/// Azure Storage service that a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Blob,
    Queue,
    Table,
}

/// What the proxy saw of a request: the service, the method and the path without the
/// query.
pub struct Request<'a> {
    pub service: Service,
    pub method: &'a str,
    pub path: &'a str,
}

/// What the proxy does with a request that a rule matches.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// Returns 503 Server Busy without forwarding the request.
    ServerBusy,
    /// Forwards the request after a pause.
    Delay(Duration),
    /// Closes the connection without a response.
    Disconnect,
    /// Forwards the request, waits for the response and closes the connection without
    /// passing the response on, as when the service stored a request whose response was
    /// lost.
    DropResponse,
}

/// Id of a rule, for removing it and for reading its count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

type Matcher = Box<dyn Fn(&Request) -> bool + Send + Sync>;

struct Rule {
    id: RuleId,
    action: Action,
    matches: Matcher,
    hits: usize,
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of each endpoint of an Azurite connection
/// string. It reads each request's head, forwards it with `Connection: close` so that a
/// connection carries one request and each request meets the rules, and then copies the
/// rest of the connection byte for byte. It stops when dropped.
pub struct FaultProxy {
    /// Taken out on drop, to shut down without waiting for open connections.
    runtime: Option<tokio::runtime::Runtime>,
    rules: Arc<Mutex<Vec<Rule>>>,
    next_id: AtomicU64,
    connection_string: String,
}

impl FaultProxy {
    /// Starts a proxy for the blob, queue and table endpoints of `connection_string`.
    pub fn start(connection_string: &str) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("failed to build the fault proxy's runtime");
        let rules = Arc::new(Mutex::new(Vec::new()));

        let mut parts = Vec::new();
        for part in connection_string.split(';').filter(|part| !part.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let service = match key {
                "BlobEndpoint" => Service::Blob,
                "QueueEndpoint" => Service::Queue,
                "TableEndpoint" => Service::Table,
                _ => {
                    parts.push(part.to_owned());
                    continue;
                }
            };
            let (upstream, path) = split_endpoint(value);
            let listener = runtime
                .block_on(TcpListener::bind("127.0.0.1:0"))
                .expect("failed to bind the fault proxy to 127.0.0.1");
            let port = listener
                .local_addr()
                .expect("a bound listener has an address")
                .port();
            runtime.spawn(accept(listener, upstream, service, rules.clone()));
            parts.push(format!("{key}=http://127.0.0.1:{port}{path}"));
        }
        FaultProxy {
            runtime: Some(runtime),
            rules,
            next_id: AtomicU64::new(1),
            connection_string: parts.join(";") + ";",
        }
    }

    /// Returns the connection string that leads through the proxy.
    pub fn connection_string(&self) -> &str {
        &self.connection_string
    }

    /// Switches on a rule: requests that `matches` accepts get `action`.
    pub fn add(&self, action: Action, matches: Matcher) -> RuleId {
        let id = RuleId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let rule = Rule {
            id,
            action,
            matches,
            hits: 0,
        };
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rule);
        id
    }

    /// Switches a rule off. Requests already held by a delay go on.
    pub fn remove(&self, id: RuleId) {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules.retain(|rule| rule.id != id);
    }

    /// Returns how many requests a rule matched, or 0 once it is removed.
    pub fn hits(&self, id: RuleId) -> usize {
        let rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        rules
            .iter()
            .find(|rule| rule.id == id)
            .map_or(0, |rule| rule.hits)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // A plain drop would wait for the connections that a daemon keeps open.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Splits `http://127.0.0.1:PORT/account` into the socket address and `/account`.
fn split_endpoint(url: &str) -> (SocketAddr, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("the fault proxy supports http:// endpoints, not {url:?}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let address = authority
        .parse()
        .unwrap_or_else(|error| panic!("endpoint {url:?} has no IP address and port: {error}"));
    (address, path.to_owned())
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    service: Service,
    rules: Arc<Mutex<Vec<Rule>>>,
) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(serve(client, upstream, service, rules.clone()));
            }
            // Out of file descriptors, for example: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Maximum size of a request head that the proxy reads, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves one connection, which carries one request.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    service: Service,
    rules: Arc<Mutex<Vec<Rule>>>,
) {
    let Some((head, rest)) = read_head(&mut client).await else {
        return;
    };
    let head_text = String::from_utf8_lossy(&head).into_owned();
    let mut request_line = head_text.lines().next().unwrap_or("").split(' ');
    let method = request_line.next().unwrap_or("").to_owned();
    let target = request_line.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_owned();

    let action = {
        let mut rules = rules.lock().unwrap_or_else(|e| e.into_inner());
        let request = Request {
            service,
            method: &method,
            path: &path,
        };
        rules
            .iter_mut()
            .find(|rule| (rule.matches)(&request))
            .map(|rule| {
                rule.hits += 1;
                rule.action
            })
    };
    match action {
        Some(Action::ServerBusy) => {
            // Reads the body first, so that the client is not cut off while it sends it.
            let length = content_length(&head_text).saturating_sub(rest.len());
            let mut body = vec![0; length];
            let _ = client.read_exact(&mut body).await;
            let _ = client.write_all(server_busy(service).as_bytes()).await;
            let _ = client.shutdown().await;
            return;
        }
        Some(Action::Disconnect) => return,
        Some(Action::Delay(pause)) => tokio::time::sleep(pause).await,
        Some(Action::DropResponse) => {
            forward_and_drop_response(&mut client, upstream, &head_text, &rest).await;
            return;
        }
        None => {}
    }

    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let forwarded = close_after_response(&head_text);
    if server.write_all(forwarded.as_bytes()).await.is_err()
        || server.write_all(&rest).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// Forwards one request with its whole body and reads the response to its end, so the
/// service has handled the request, but sends the client nothing.
async fn forward_and_drop_response(
    client: &mut TcpStream,
    upstream: SocketAddr,
    head: &str,
    rest: &[u8],
) {
    let mut body = vec![0; content_length(head).saturating_sub(rest.len())];
    if client.read_exact(&mut body).await.is_err() {
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let forwarded = close_after_response(head);
    for part in [forwarded.as_bytes(), rest, &body] {
        if server.write_all(part).await.is_err() {
            return;
        }
    }
    let mut response = Vec::new();
    let _ = server.read_to_end(&mut response).await;
}

/// Reads up to the end of the request head. Returns the head, which ends with the empty
/// line, and the bytes read after it.
async fn read_head(client: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Some((buffer, rest));
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return None;
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

/// Returns the head with its `Connection` header replaced by `Connection: close`.
fn close_after_response(head: &str) -> String {
    let mut lines: Vec<&str> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    lines.join("\r\n") + "\r\n\r\n"
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Builds a 503 response as the service sends it when it is overloaded, with the error body of
/// each service: JSON for tables, XML for queues and blobs.
fn server_busy(service: Service) -> String {
    let detail = "The server is busy (a rule of the test's fault proxy).";
    let (content_type, body) = match service {
        Service::Table => (
            "application/json;odata=minimalmetadata",
            format!(
                r#"{{"odata.error":{{"code":"ServerBusy","message":{{"lang":"en-US","value":"{detail}"}}}}}}"#
            ),
        ),
        Service::Queue | Service::Blob => (
            "application/xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ServerBusy</Code>\
                 <Message>{detail}</Message></Error>"
            ),
        ),
    };
    format!(
        "HTTP/1.1 503 The server is busy.\r\nContent-Type: {content_type}\r\n\
         x-ms-error-code: ServerBusy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
