//! `--metrics-addr ADDR:PORT`: the counters of `query-stats` over HTTP in the OpenMetrics
//! text format (which Prometheus scrapes), encoded by prometheus-client.
//!
//! Every scrape reads the same counters as the control socket's `query-stats`
//! ([`LayerControl::stats`]) and turns them into metric families named
//! `<program>_<field>` (dashes become underscores): numbers in the top level are the
//! device's counters; arrays of objects (`queues`, serial's `ports`, net's `queue-pairs`)
//! give one sample per element, labelled `queue` (`port`, or `index`) and with the
//! element's string fields (a queue's `role`, a port's `name`) as labels. Counters get the
//! usual `_total` suffix; fields that go down as well as up (`in-flight`, `*-peak`, `held`,
//! states such as `guest-open`) are gauges. A latency histogram ([`crate::histogram`], e.g.
//! blk's `latency-histogram` per queue) becomes a histogram family in seconds,
//! `<program>_queue_latency_seconds` with `_bucket{le=...}`, `_sum` and `_count`.
//!
//! One thread serves the address, one request at a time, `GET /metrics` only (404
//! otherwise, 405 for other methods); a request head may be at most 8 KiB and must arrive
//! within 2 s. The socket is bound before the sandbox starts; the thread runs under the
//! control socket's filter.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::control::LayerControl;
use crate::sandbox::{self, ThreadKind};

/// Largest request head taken.
const MAX_HEAD: usize = 8 << 10;

/// Labels of one sample.
type Labels = Vec<(String, String)>;

/// One sample: a number, or a histogram (sum in seconds, count, and the non-cumulative
/// bins with their upper bounds in seconds, the last +Inf).
enum Sample {
    Number(u64),
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

/// One metric family: its type, its help text and its samples.
type Family = (MetricType, String, Vec<(Labels, Sample)>);

/// A `query-stats` histogram ([`crate::histogram::LatencyHistogram::to_json`]) as a
/// Prometheus sample; None if `obj` is not one (or is inconsistent).
fn histogram(obj: &serde_json::Map<String, Value>) -> Option<Sample> {
    let h = crate::histogram::HistogramView::from_json(obj)?;
    let buckets = h
        .bounds_us
        .iter()
        .map(|&b| b as f64 / 1e6)
        .chain([f64::INFINITY])
        .zip(h.bins.iter().copied())
        .collect();
    Some(Sample::Histogram {
        sum: h.sum_us as f64 / 1e6,
        count: h.count(),
        buckets,
    })
}

/// Whether a `query-stats` field is a gauge (it goes down as well as up).
fn is_gauge(key: &str) -> bool {
    key.contains("in-flight") || key.ends_with("-peak") || key == "held" || key.ends_with("-open")
}

fn metric_name(prefix: &str, key: &str) -> String {
    let mut n = String::with_capacity(prefix.len() + key.len() + 1);
    n.push_str(prefix);
    if !prefix.is_empty() && !key.is_empty() {
        n.push('_');
    }
    n.extend(
        key.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    n
}

/// Adds the numbers of `obj` (and of its arrays of objects) to `families`.
fn collect(
    obj: &serde_json::Map<String, Value>,
    prefix: &str,
    labels: &Labels,
    families: &mut BTreeMap<String, Family>,
) {
    for (k, v) in obj {
        match v {
            Value::Number(n) => {
                let Some(n) = n.as_u64() else { continue };
                let ty = if is_gauge(k) {
                    MetricType::Gauge
                } else {
                    MetricType::Counter
                };
                families
                    .entry(metric_name(prefix, k))
                    .or_insert_with(|| (ty, format!("query-stats: {k}"), Vec::new()))
                    .2
                    .push((labels.clone(), Sample::Number(n)));
            }
            Value::Object(o) => {
                let Some(h) = histogram(o) else { continue };
                let base = k.strip_suffix("-histogram").unwrap_or(k);
                families
                    .entry(metric_name(prefix, &format!("{base}-seconds")))
                    .or_insert_with(|| {
                        (
                            MetricType::Histogram,
                            format!("query-stats: {k}, in seconds"),
                            Vec::new(),
                        )
                    })
                    .2
                    .push((labels.clone(), h));
            }
            Value::Array(items) => {
                // `queues` gives `<program>_queue_*{queue="N"}` and `ports`
                // `<program>_port_*{port="N"}`, N from the element's own `queue` or `port`
                // (a port's id, which need not be its position); other arrays keep their
                // name and an `index` label.
                let (sub, label) = match k.as_str() {
                    "queues" => (metric_name(prefix, "queue"), "queue"),
                    "ports" => (metric_name(prefix, "port"), "port"),
                    _ => (metric_name(prefix, k), "index"),
                };
                for (i, item) in items.iter().enumerate() {
                    let Value::Object(o) = item else { continue };
                    let id = o.get(label).and_then(Value::as_u64).unwrap_or(i as u64);
                    let mut l = labels.clone();
                    l.push((label.to_string(), id.to_string()));
                    for (sk, sv) in o {
                        if let Value::String(s) = sv {
                            l.push((metric_name("", sk), s.clone()));
                        }
                    }
                    let inner: serde_json::Map<String, Value> = o
                        .iter()
                        .filter(|(sk, _)| sk.as_str() != label)
                        .map(|(sk, sv)| (sk.clone(), sv.clone()))
                        .collect();
                    collect(&inner, &sub, &l, families);
                }
            }
            _ => {}
        }
    }
}

/// prometheus-client's view of the counters: read afresh on every scrape.
struct StatsCollector {
    prefix: String,
    layer: LayerControl,
}

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsCollector")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Value::Object(stats) = self.layer.stats() else {
            return Ok(());
        };
        let mut families = BTreeMap::new();
        collect(&stats, &self.prefix, &Vec::new(), &mut families);
        for (name, (ty, help, samples)) in &families {
            let mut family = encoder.encode_descriptor(name, help, None, *ty)?;
            for (labels, v) in samples {
                let mut m = family.encode_family(labels)?;
                match v {
                    Sample::Number(v) if *ty == MetricType::Counter => {
                        ConstCounter::new(*v).encode(m)?
                    }
                    Sample::Number(v) => {
                        ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(m)?
                    }
                    Sample::Histogram {
                        sum,
                        count,
                        buckets,
                    } => m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

/// The metrics endpoint; stopped (thread joined) on drop.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `layer`'s counters as `<program>_*` metrics in a thread.
    pub fn start(addr: SocketAddr, program: &str, layer: LayerControl) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector {
            prefix: metric_name("", program),
            layer,
        }));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                sandbox::enter_or_exit(ThreadKind::Control);
                serve(&listener, &registry, &stop2);
            })?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address served (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if self.stop.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn serve(listener: &TcpListener, registry: &Registry, stop: &EventFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: a valid array of two pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            log::error!("metrics: poll: {}", io::Error::last_os_error());
            return;
        }
        if stop.read().is_ok() {
            return;
        }
        match listener.accept() {
            Ok((conn, peer)) => {
                if let Err(e) = answer(conn, registry) {
                    log::debug!("metrics: {peer}: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request head and answers it; the connection is closed after.
fn answer(mut conn: TcpStream, registry: &Registry) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
            );
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != b"GET" {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only\n",
        );
    }
    if path != b"/metrics" {
        return respond(&mut conn, "404 Not Found", "text/plain", b"see /metrics\n");
    }
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)
        .map_err(|_| io::Error::other("encoding the metrics"))?;
    respond(
        &mut conn,
        "200 OK",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body.as_bytes(),
    )
}

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ControlHandler, QmpError};
    use crate::server::ServerState;
    use serde_json::{json, Map};
    use std::sync::atomic::Ordering;

    struct Dev;

    impl ControlHandler for Dev {
        fn commands(&self) -> Vec<&'static str> {
            Vec::new()
        }
        fn execute(&self, _: &str, _: &Map<String, Value>) -> Result<Value, QmpError> {
            Err(QmpError::generic("none"))
        }
        fn device_stats(&self) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert("writes".into(), json!(3));
            m.insert("in-flight".into(), json!(1));
            m.insert("pairs".into(), json!([{"tx-packets": 7}]));
            m.insert(
                "ports".into(),
                json!([{"port": 2, "name": "org.x", "tx-bytes": 9, "guest-open": 1}]),
            );
            m
        }
        fn queue_stats(&self, index: usize) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert("role".into(), json!(format!("q{index}")));
            let h = crate::histogram::LatencyHistogram::new();
            for us in [5, 30, 30, 2_000_000] {
                h.record(std::time::Duration::from_micros(us * (index as u64 + 1)));
            }
            m.insert("latency-histogram".into(), h.to_json());
            m
        }
    }

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn a_scrape_has_the_counters_per_device_and_per_queue() {
        let state = Arc::new(ServerState::new(2));
        state.stats()[1].chains.store(5, Ordering::Relaxed);
        state.stats()[1].completed.store(4, Ordering::Relaxed);
        let layer = LayerControl::new("test-backend", "1.0", state, Arc::new(Dev));
        let m =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), "test-backend", layer).unwrap();
        let r = get(m.local_addr(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("application/openmetrics-text"), "{r}");
        for line in [
            "# TYPE test_backend_writes counter",
            "test_backend_writes_total 3",
            "# TYPE test_backend_in_flight gauge",
            "test_backend_in_flight 1",
            "test_backend_pairs_tx_packets_total{index=\"0\"} 7",
            "test_backend_port_tx_bytes_total{port=\"2\",name=\"org.x\"} 9",
            "# TYPE test_backend_port_guest_open gauge",
            "test_backend_port_guest_open{port=\"2\",name=\"org.x\"} 1",
            "test_backend_queue_chains_total{queue=\"1\",role=\"q1\"} 5",
            "test_backend_queue_completed_total{queue=\"1\",role=\"q1\"} 4",
            "test_backend_queue_in_flight{queue=\"1\",role=\"q1\"} 1",
            "test_backend_queue_chains_total{queue=\"0\",role=\"q0\"} 0",
            "# TYPE test_backend_queue_latency_seconds histogram",
            "test_backend_queue_latency_seconds_count{queue=\"0\",role=\"q0\"} 4",
            "test_backend_queue_latency_seconds_sum{queue=\"0\",role=\"q0\"} 2.000065",
            "test_backend_queue_latency_seconds_bucket{le=\"0.00001\",queue=\"0\",role=\"q0\"} 1",
            "test_backend_queue_latency_seconds_bucket{le=\"0.00005\",queue=\"0\",role=\"q0\"} 3",
            "test_backend_queue_latency_seconds_bucket{le=\"1.0\",queue=\"0\",role=\"q0\"} 3",
            "test_backend_queue_latency_seconds_bucket{le=\"+Inf\",queue=\"0\",role=\"q0\"} 4",
            "test_backend_queue_latency_seconds_count{queue=\"1\",role=\"q1\"} 4",
            "# EOF",
        ] {
            assert!(r.lines().any(|l| l == line), "no line {line:?} in\n{r}");
        }
        let r = get(m.local_addr(), "GET / HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(m.local_addr(), "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        // A head that never ends is cut off at the limit, and the server goes on.
        let mut c = TcpStream::connect(m.local_addr()).unwrap();
        let _ = c.write_all(&vec![b'a'; MAX_HEAD + 2048]);
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        let r = get(m.local_addr(), "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    }
}
