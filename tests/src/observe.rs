//! Observability parts for the tests: a real Prometheus (Debian's `prometheus`) with a
//! generated config, and an OTLP/HTTP logs receiver that decodes what it is sent with
//! the official OpenTelemetry protocol definitions (`opentelemetry-proto`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::Message;
use serde_json::Value as Json;

use crate::free_port;
use crate::procs::{Proc, http_ok, wait_until};

/// A Prometheus server on a free loopback port, scraping `targets` every second, with
/// its own data dir under `dir`; killed on drop.
pub struct Prometheus {
    pub proc: Proc,
    pub port: u16,
}

/// One scrape job: a name, `host:port`, and the metrics path.
pub struct Target<'a> {
    pub job: &'a str,
    pub address: String,
    pub path: &'a str,
}

impl Prometheus {
    pub async fn start(targets: &[Target<'_>], dir: &Path) -> Prometheus {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n",
        );
        for t in targets {
            config.push_str(&format!(
                "  - job_name: {}\n    metrics_path: {}\n    static_configs:\n      - targets: ['{}']\n",
                t.job, t.path, t.address
            ));
        }
        Self::start_config(&config, dir).await
    }

    /// Runs the config `config` (YAML text) as it is.
    pub async fn start_config(config: &str, dir: &Path) -> Prometheus {
        let port = free_port();
        let config_file = dir.join(format!("prometheus-{port}.yml"));
        std::fs::write(&config_file, config).expect("writing the Prometheus config");
        let data = dir.join(format!("prometheus-{port}-data"));
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let mut proc = Proc::spawn(&format!("prometheus-{port}"), cmd, dir);
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        wait_until(&mut proc, "prometheus", || {
            let ready = ready.clone();
            async move { http_ok(&ready).await }
        })
        .await;
        Prometheus { proc, port }
    }

    /// The samples of an instant query: each series' labels and value.
    pub async fn query(&self, expr: &str) -> Vec<(Json, f64)> {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let form: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .finish();
        let body: Json = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .expect("prometheus query")
            .json()
            .await
            .expect("prometheus answers JSON");
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"]
            .as_array()
            .expect("a vector result")
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().and_then(|v| v.parse().ok());
                (s["metric"].clone(), value.expect("a sample value"))
            })
            .collect()
    }

    /// The single value of `expr` (a sum, say); `None` while it has no sample.
    pub async fn value(&self, expr: &str) -> Option<f64> {
        self.query(expr).await.first().map(|(_, v)| *v)
    }

    /// Polls `expr` until `pred` holds for its value (30 s at most); returns it.
    pub async fn wait_for(&self, expr: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.value(expr).await;
            if let Some(v) = value.filter(|v| pred(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} is {value:?} after 30 s; Prometheus targets: {}",
                self.targets().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its view of the scrape targets (for failure messages).
    async fn targets(&self) -> String {
        let url = format!("http://127.0.0.1:{}/api/v1/targets", self.port);
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => e.to_string(),
        }
    }
}

/// The shipped scrape config (`docs/observability/prometheus.yml`) with each job's
/// target replaced by `targets` (`(job, host:port)`) and a 1 s scrape interval, so a
/// test runs what operators are given. Panics if a job is not in the file.
pub fn example_config(targets: &[(&str, String)]) -> String {
    let path = crate::workspace_root().join(EXAMPLE_CONFIG);
    let text = std::fs::read_to_string(&path).expect("reading the example scrape config");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    config["global"]["scrape_interval"] = "1s".into();
    config["global"]["scrape_timeout"] = "900ms".into();
    config["global"]["evaluation_interval"] = "1s".into();
    for (job, address) in targets {
        let jobs = config["scrape_configs"]
            .as_sequence_mut()
            .expect("scrape_configs");
        let entry = jobs
            .iter_mut()
            .find(|j| j["job_name"].as_str() == Some(job))
            .unwrap_or_else(|| panic!("no job {job} in {EXAMPLE_CONFIG}"));
        entry["static_configs"] =
            serde_yaml::from_str(&format!("[{{targets: ['{address}']}}]")).expect("static_configs");
    }
    serde_yaml::to_string(&config).expect("YAML text")
}

/// Where the example scrape config is, under the workspace.
pub const EXAMPLE_CONFIG: &str = "docs/observability/prometheus.yml";

/// Records an OTLP logs receiver was sent, in the order they arrived, and each
/// request's content type with, for OTLP/JSON, the body as sent.
#[derive(Debug, Clone, Default)]
pub struct Received {
    records: Arc<Mutex<Vec<LogRecord>>>,
    requests: Arc<Mutex<Vec<Request>>>,
}

/// One export request the receiver took.
#[derive(Debug, Clone)]
pub struct Request {
    pub content_type: String,
    pub records: usize,
    /// The body, for an `application/json` request.
    pub json: Option<Json>,
}

impl Received {
    pub fn records(&self) -> Vec<LogRecord> {
        self.records.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// How many records arrived (duplicates counted).
    pub fn len(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each record's `mcpguard.audit.id`, in arrival order (duplicates kept).
    pub fn ids(&self) -> Vec<i64> {
        self.records().iter().map(audit_id).collect()
    }

    /// The ids in arrival order with repeats dropped (a receiver's de-duplication by
    /// `log.record.uid`): at-least-once delivery in id order makes this ascending.
    pub fn unique_ids(&self) -> Vec<i64> {
        let mut seen = std::collections::HashSet::new();
        self.ids()
            .into_iter()
            .filter(|id| seen.insert(*id))
            .collect()
    }
}

/// A record's `mcpguard.audit.id` attribute.
pub fn audit_id(r: &LogRecord) -> i64 {
    r.attributes
        .iter()
        .find(|a| a.key == "mcpguard.audit.id")
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            Value::IntValue(id) => Some(*id),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a record without mcpguard.audit.id: {r:?}"))
}

/// An OTLP/HTTP logs receiver (`POST /v1/logs`, protobuf) on a fixed loopback port.
/// [`OtlpReceiver::stop`] closes the listener and every connection at once, as a
/// collector that went away; [`OtlpReceiver::start`] listens again on the same port.
pub struct OtlpReceiver {
    pub port: u16,
    pub received: Received,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl OtlpReceiver {
    pub async fn new() -> OtlpReceiver {
        let mut receiver = OtlpReceiver {
            port: free_port(),
            received: Received::default(),
            server: None,
        };
        receiver.start().await;
        receiver
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/logs", self.port)
    }

    pub async fn start(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("binding the OTLP receiver");
        let received = self.received.clone();
        self.server = Some(tokio::spawn(async move {
            // Connections live in this set, so aborting the server ends them too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let received = received.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let received = received.clone();
                        async move { Ok::<_, hyper::Error>(answer(req, &received).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }

    /// Closes the listener and every open connection.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    received: &Received,
) -> hyper::Response<Full<Bytes>> {
    let status = |code: u16, body: Vec<u8>| {
        hyper::Response::builder()
            .status(code)
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/logs" {
        return status(400, Vec::new());
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(400, Vec::new());
    };
    let body = body.to_bytes();
    // OTLP/HTTP: protobuf, or OTLP/JSON (proto3 JSON with OTLP's rules), each decoded
    // with the definitions of `opentelemetry-proto`.
    let (request, json) = match content_type.as_str() {
        "application/x-protobuf" => match ExportLogsServiceRequest::decode(body) {
            Ok(request) => (request, None),
            Err(_) => return status(400, Vec::new()),
        },
        "application/json" => {
            let (Ok(request), Ok(json)) = (
                serde_json::from_slice::<ExportLogsServiceRequest>(&body),
                serde_json::from_slice::<Json>(&body),
            ) else {
                return status(400, Vec::new());
            };
            (request, Some(json))
        }
        _ => return status(415, Vec::new()),
    };
    let records: Vec<LogRecord> = request
        .resource_logs
        .into_iter()
        .flat_map(|r| r.scope_logs)
        .flat_map(|s| s.log_records)
        .collect();
    received.requests.lock().unwrap().push(Request {
        content_type,
        records: records.len(),
        json,
    });
    received.records.lock().unwrap().extend(records);
    status(200, ExportLogsServiceResponse::default().encode_to_vec())
}
