//! The deployment files mean what the code does. The Kubernetes manifests (`deploy/kubernetes`, rendered here
//! as kustomize renders them: `resources` followed, `namespace` applied) scale each model's workers on the
//! JetStream consumer the code names and the queen creates before any worker exists, run commands the binary
//! accepts, and probe routes that answer on the ports they name. The NATS URL with credentials that
//! `compose.yaml` gives its services reaches a server that asks for them.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use serde::Deserialize as _;
use serde_json::Value;

use common::queen::{client, start_queen, tiny};
use common::servers::{free_port, http, sd_rbee_binary, tool, NatsServer, WorkerProcess};
use sd_rbee::cli::{Cli, Command as Sub};
use sd_rbee::protocol::Subjects;
use sd_rbee::vocab::Priority;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every document of a YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects `kubectl kustomize dir` makes of a tree that uses only `resources` and `namespace`.
fn render(dir: &Path) -> Vec<Value> {
    let kustomization = documents(&dir.join("kustomization.yaml")).remove(0);
    let known = ["apiVersion", "kind", "resources", "namespace"];
    for key in kustomization.as_object().unwrap().keys() {
        assert!(known.contains(&key.as_str()), "{}: this renderer knows no `{key}`", dir.display());
    }
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_array().unwrap() {
        let path = dir.join(resource.as_str().unwrap());
        objects.extend(if path.is_dir() { render(&path) } else { documents(&path) });
    }
    if let Some(namespace) = kustomization["namespace"].as_str() {
        for object in objects.iter_mut().filter(|o| o["kind"] != "Namespace") {
            object["metadata"]["namespace"] = namespace.into();
        }
    }
    objects
}

fn manifests() -> Vec<Value> {
    render(&repo("deploy/kubernetes"))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    objects.iter().filter(move |o| o["kind"] == kind)
}

fn container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{}", deployment["metadata"]["name"]);
    &containers[0]
}

/// The container's command line as the binary parses it (clap refuses an unknown flag or value).
fn parse_args(container: &Value) -> Cli {
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    Cli::try_parse_from(std::iter::once("sd-rbee").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("`sd-rbee {}` does not parse: {e}", args.join(" ")))
}

/// The value the container's args give `flag` (`--flag VALUE` or `--flag=VALUE`). What the manifest says,
/// read from the manifest: clap would also take the test's own environment (`env = "SD_RBEE_..."`).
fn arg_value(container: &Value, flag: &str) -> Option<String> {
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let inline = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).map(|v| v.to_string())
        } else {
            a.strip_prefix(&inline).map(str::to_string)
        }
    })
}

/// The port a probe asks: a number, or the name of one of the container's ports.
fn probe_port(container: &Value, probe: &Value) -> u16 {
    let port = &probe["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let ports = container["ports"].as_array().unwrap();
    let named = ports.iter().find(|p| p["name"] == *port).unwrap_or_else(|| panic!("no port named {port}"));
    named["containerPort"].as_u64().unwrap() as u16
}

/// The container's HTTP probes: (kind, path, port).
fn probes(container: &Value) -> Vec<(&'static str, String, u16)> {
    let mut out = Vec::new();
    for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let probe = &container[kind];
        assert!(probe.is_object(), "every container has a {kind}");
        out.push((kind, probe["httpGet"]["path"].as_str().unwrap().to_string(), probe_port(container, probe)));
    }
    out
}

fn catalogue(objects: &[Value]) -> Vec<String> {
    let config = find(objects, "ConfigMap", "sd-rbee-config");
    let list = config["data"]["SD_RBEE_MODEL_CATALOGUE"].as_str().expect("the queen's model catalogue");
    list.split(',').map(|m| m.trim().to_string()).collect()
}

#[test]
fn the_manifests_render_as_kubectl_renders_them() {
    let objects = manifests();
    assert!(objects.len() >= 8, "{objects:?}");
    for object in &objects {
        assert!(object["kind"].is_string() && object["metadata"]["name"].is_string(), "{object}");
    }
    // kubectl is on some machines, not all: where it is, its kustomize must make the same objects.
    let Ok(out) = Command::new("kubectl").args(["kustomize"]).arg(repo("deploy/kubernetes")).output() else {
        eprintln!("kubectl not found: the rendering is not compared with kustomize's");
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = |o: &Value| format!("{}/{}/{}", o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]);
    let theirs: std::collections::BTreeSet<String> =
        serde_yaml_ng::Deserializer::from_str(std::str::from_utf8(&out.stdout).unwrap())
            .map(|d| key(&Value::deserialize(d).unwrap()))
            .collect();
    let ours: std::collections::BTreeSet<String> = objects.iter().map(key).collect();
    assert_eq!(ours, theirs);
}

#[test]
fn every_model_scales_on_the_consumer_its_workers_share() {
    let objects = manifests();
    let catalogue = catalogue(&objects);
    let config = find(&objects, "ConfigMap", "sd-rbee-config");
    let mut scaled = Vec::new();
    for scaler in of_kind(&objects, "ScaledObject") {
        let target = &scaler["spec"]["scaleTargetRef"];
        assert_eq!(target["kind"], "Deployment");
        let deployment = find(&objects, "Deployment", target["name"].as_str().unwrap());
        let container = container(deployment);
        let Sub::Worker(worker) = parse_args(container).command else { panic!("{} runs no worker", target["name"]) };
        // One model per Deployment: its consumer's lag is then exactly the queue these pods serve.
        assert_eq!(worker.models.len(), 1, "{}", target["name"]);
        let model = &worker.models[0].name;
        // As the worker in the pod sees it: its --prefix, else the ConfigMap's SD_RBEE_PREFIX, else the default.
        let configured = config["data"]["SD_RBEE_PREFIX"].as_str().map(str::to_string);
        let prefix = arg_value(container, "--prefix").or(configured).unwrap_or_else(|| "sd".into());
        let subjects = Subjects::new(prefix).unwrap();

        // One trigger per priority, on that priority's durable consumer; the scaling formula adds them all.
        let triggers = scaler["spec"]["triggers"].as_array().unwrap();
        assert_eq!(triggers.len(), Priority::ALL.len());
        let modifiers = &scaler["spec"]["advanced"]["scalingModifiers"];
        let formula = modifiers["formula"].as_str().expect("a scaling formula");
        assert!(modifiers["target"].is_string() && modifiers["activationTarget"] == "0", "{modifiers}");
        for priority in Priority::ALL {
            let trigger = triggers.iter().find(|t| t["name"] == priority.as_str());
            let trigger = trigger.unwrap_or_else(|| panic!("no trigger named {}", priority.as_str()));
            assert_eq!(trigger["type"], "nats-jetstream");
            let terms: Vec<&str> = formula.split('+').map(str::trim).collect();
            assert_eq!(terms.iter().filter(|t| **t == priority.as_str()).count(), 1, "{formula} adds each once");
            let meta = &trigger["metadata"];
            assert_eq!(meta["stream"], subjects.jobs_stream(), "the jobs stream");
            let consumer = sd_rbee::bus::priority_consumer_name(model, priority);
            assert_eq!(meta["consumer"], consumer, "the model's durable consumer at {}", priority.as_str());
            assert_eq!(meta["account"], "$G", "nats-server's default account, where the streams are");
            assert!(meta["natsServerMonitoringEndpoint"].as_str().unwrap().ends_with(":8222"), "{meta}");
            for (key, value) in meta.as_object().unwrap() {
                assert!(value.is_string(), "KEDA's metadata values are strings: {key} = {value}");
            }
        }
        assert_eq!(formula.split('+').count(), Priority::ALL.len(), "{formula}");
        assert_eq!(scaler["spec"]["minReplicaCount"], 0, "scales to zero");
        assert!(catalogue.contains(model), "the queen's catalogue lists {model}, so its consumer exists at zero");

        let spec = &deployment["spec"];
        assert!(spec["replicas"].is_null(), "KEDA owns the replica count of {}", target["name"]);
        let gpus = &container["resources"]["limits"]["nvidia.com/gpu"];
        assert!(gpus.as_u64().or_else(|| gpus.as_str()?.parse().ok()).unwrap_or(0) >= 1, "a GPU per worker");
        let pod = &spec["template"]["spec"];
        let termination = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
        assert!(termination > worker.grace + Duration::from_secs(5), "the pod outlives the worker's --grace");
        assert!(container["lifecycle"]["preStop"].is_object(), "a preStop hook");
        let health = arg_value(container, "--health-listen").expect("the worker serves its probes (--health-listen)");
        let health: std::net::SocketAddr = health.parse().unwrap();
        for (kind, _, port) in probes(container) {
            assert_eq!(port, health.port(), "{kind} asks the port --health-listen serves");
        }
        scaled.push(target["name"].as_str().unwrap().to_string());
    }
    assert!(!scaled.is_empty(), "no ScaledObject");
    for deployment in of_kind(&objects, "Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        match parse_args(container(deployment)).command {
            Sub::Worker(_) => assert!(scaled.iter().any(|s| s == name), "{name} has no ScaledObject"),
            Sub::Queen(_) => {
                let listen = arg_value(container(deployment), "--listen").expect("the queen's --listen");
                let listen: std::net::SocketAddr = listen.parse().unwrap();
                for (kind, _, port) in probes(container(deployment)) {
                    assert_eq!(port, listen.port(), "{kind} asks the port --listen serves");
                }
                let pdb = of_kind(&objects, "PodDisruptionBudget").next().expect("the queen has a PodDisruptionBudget");
                assert_eq!(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
            }
            other => panic!("{name} runs {other:?}"),
        }
    }
}

/// A child process killed when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `GET url` until it answers, for at most `limit`.
fn answer(port: u16, path: &str, limit: Duration) -> (u16, Value) {
    let start = Instant::now();
    loop {
        if let Ok((status, body)) = http("GET", port, path, b"") {
            return (status, serde_json::from_slice(&body).unwrap_or(Value::Null));
        }
        assert!(start.elapsed() < limit, "nothing answers on {port}{path}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_answer_and_the_scaler_sees_a_queue_before_any_worker() {
    let objects = manifests();
    let models = catalogue(&objects);
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let listed = models.clone();
    let queen = start_queen(&nats.url(), &store, &[], |c| c.api.model_catalogue = listed).await;
    let queen_port: u16 = queen.base.rsplit(':').next().unwrap().parse().unwrap();

    // The queen's probes, at the paths the manifest names.
    let queen_container = container(find(&objects, "Deployment", "sd-rbee-queen"));
    for (kind, path, _) in probes(queen_container) {
        let (status, body) = answer(queen_port, &path, Duration::from_secs(5));
        assert_eq!(status, 200, "queen {kind} {path}: {body}");
    }

    // What KEDA's nats-jetstream scaler reads (`/jsz?acc=ACCOUNT&consumers=true`): each catalogued model's
    // consumer, made by the queen with no worker anywhere, and its lag once a job waits.
    let model = &models[0];
    let mut job = tiny(2, 1);
    job.model = model.clone();
    client(&queen).submit(&job, None).await.expect("a job for a model no worker serves yet is accepted");
    let scaler = find(&objects, "ScaledObject", &format!("sd-rbee-worker-{model}"));
    let triggers = scaler["spec"]["triggers"].as_array().unwrap();
    let meta = &triggers.iter().find(|t| t["name"] == "normal").expect("the normal-priority trigger")["metadata"];
    let account = meta["account"].as_str().unwrap();
    let path = format!("/jsz?acc={}&consumers=true&config=true", account.replace('$', "%24"));
    let (status, jsz) = answer(nats.monitor_port, &path, Duration::from_secs(5));
    assert_eq!(status, 200);
    let details = jsz["account_details"].as_array().unwrap();
    let account = details.iter().find(|a| a["name"] == account).unwrap_or_else(|| panic!("{jsz}"));
    let stream = account["stream_detail"].as_array().unwrap().iter().find(|s| s["name"] == meta["stream"]);
    let stream = stream.unwrap_or_else(|| panic!("no stream {} in {jsz}", meta["stream"]));
    for model in &models {
        for priority in Priority::ALL {
            let name = sd_rbee::bus::priority_consumer_name(model, priority);
            let consumers = stream["consumer_detail"].as_array().unwrap();
            assert!(consumers.iter().any(|c| c["name"] == name), "no consumer {name}: {stream}");
        }
    }
    let consumer = stream["consumer_detail"].as_array().unwrap().iter().find(|c| c["name"] == meta["consumer"]);
    let consumer = consumer.unwrap_or_else(|| panic!("no consumer {}: {stream}", meta["consumer"]));
    assert_eq!(consumer["num_pending"], 1, "the waiting job is the lag that activates the scaler: {consumer}");

    // A worker's probes, at the paths the manifest names: alive but not ready while it starts (here: while
    // it cannot reach NATS), then ready.
    let worker_container = container(
        of_kind(&objects, "Deployment").find(|d| matches!(parse_args(container(d)).command, Sub::Worker(_))).unwrap(),
    );
    let worker_probes = probes(worker_container);
    let health = free_port();
    let listen = format!("127.0.0.1:{health}");
    let model_arg = format!("tiny={}", common::fixture("tiny-sd15").display());
    let starting = Killed(
        Command::new(sd_rbee_binary())
            .args(["worker", "--nats", "nats://127.0.0.1:1", "--store", &store, "--model", &model_arg])
            .args(["--health-listen", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for (kind, path, _) in &worker_probes {
        let (status, body) = answer(health, path, Duration::from_secs(10));
        let want = if path == "/ready" { 503 } else { 200 };
        assert_eq!(status, want, "a starting worker's {kind} {path}: {body}");
    }
    drop(starting);
    let health = free_port();
    let listen = format!("127.0.0.1:{health}");
    let _worker = WorkerProcess::start("probed", &nats.url(), &store, &[], &["--health-listen", &listen]);
    for (kind, path, _) in &worker_probes {
        let (status, body) = answer(health, path, Duration::from_secs(5));
        assert_eq!(status, 200, "a ready worker's {kind} {path}: {body}");
    }
    // Cut off from NATS: alive (it reconnects by itself), not ready; ready again once NATS is back.
    let mut nats = nats;
    nats.kill();
    let ready_is = |want: u16| {
        let start = Instant::now();
        loop {
            let (status, body) = answer(health, "/ready", Duration::from_secs(5));
            if status == want {
                return body;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "/ready stays {status}: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(ready_is(503)["status"], "disconnected from NATS");
    assert_eq!(answer(health, "/health", Duration::from_secs(5)).0, 200);
    nats.restart();
    ready_is(200);
}

#[test]
fn a_nats_url_with_credentials_reaches_a_server_that_asks_for_them() {
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let _server = Killed(
        Command::new(tool("nats-server"))
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "--user", "sd-rbee", "--pass", "s3cret-pass"])
            .arg("-sd")
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(15), "nats-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let submit = |url: &str| {
        Command::new(sd_rbee_binary())
            .args(["submit", "--nats", url, "-m", "tiny", "-p", "a kite", "--width", "64", "--height", "64"])
            .env_remove("SD_RBEE_QUEEN_URL")
            .output()
            .unwrap()
    };
    let out = submit(&format!("nats://sd-rbee:s3cret-pass@127.0.0.1:{port}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = submit(&format!("nats://sd-rbee:wrong-pass@127.0.0.1:{port}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong password is refused");
    assert!(err.contains(&format!("nats://127.0.0.1:{port}")) && !err.contains("wrong-pass"), "{err}");
}
