//! The test servers themselves (`common::servers`): one whose port another process took between
//! `free_port` and its bind starts on another port.

use crate::common::servers::{free_port, http, NatsServer, S3Backend, S3Server};

/// The servers start on other ports when theirs is taken between [`free_port`] and their bind (the likely
/// cause of a CI run's "nats-server was not ready within 20s").
#[test]
fn servers_whose_port_is_taken_start_on_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let nats = NatsServer::start_from(port, free_port());
    assert_ne!(nats.port, port);
    assert!(matches!(http("GET", nats.monitor_port, "/healthz?js-enabled-only=true", b""), Ok((200, _))));
    let taken_monitor = NatsServer::start_from(free_port(), port);
    assert_ne!(taken_monitor.monitor_port, port);

    let s3 = S3Server::start_on(S3Backend::S3sFs { root: tempfile::tempdir().unwrap() }, port);
    assert_ne!(s3.port, port);
    s3.put("a", b"b");
    assert_eq!(s3.get("a").as_deref(), Some(&b"b"[..]));
}
