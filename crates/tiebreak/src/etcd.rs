//! Test-and-set on an etcd v3 cluster, through etcd's JSON gateway over plain HTTP.
//!
//! A claim of epoch `E` of VM `V` is one transaction on key `ftvm/V/epoch/<E as 20 digits>`:
//!
//! ```text
//! POST /v3/kv/txn
//!   compare: create_revision(key) == 0        (the key was never created)
//!   success: put key = owner                  -> "succeeded": true   => we won
//!   failure: range key                        -> the holder, read in the same transaction
//! ```
//!
//! The liveness record ([`Beat`]) is a plain put on `ftvm/V/beat`, outside the claims' range.
//! Each put is a new revision of that key, which etcd keeps until the cluster is compacted: a
//! running primary adds one a second (about 134 bytes each to etcd 3.4's database, measured),
//! so a cluster that serves ftvm needs auto-compaction (`--auto-compaction-retention`). This
//! crate never compacts: compaction is cluster-wide, an operator's decision.
//!
//! etcd serialises transactions through Raft, so exactly one claimant sees `succeeded`. Reading the
//! holder in the failure branch (rather than with a second request) means the answer is consistent
//! with the comparison that failed.
//!
//! Endpoints are tried in order; the first that answers decides. Moving on after a timeout is safe:
//! if the first endpoint committed our claim but its answer was lost, the next one reports the key
//! as held by our own owner string, which counts as a win (see the crate docs).
//!
//! The JSON gateway encodes keys and values in base64 and 64-bit integers as strings, and leaves
//! out fields that have their default value (`"succeeded": false` is simply absent).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::{
    epoch_digits, outcome_for, parse_epoch_digits, validate_claim, validate_vm_id, Beat, Outcome,
    TestAndSet, TiebreakError,
};

/// Every key this crate writes starts with this.
pub const ETCD_KEY_PREFIX: &str = "ftvm/";
/// How long to wait for a TCP connection to one endpoint.
pub const ETCD_TIMEOUT_CONNECT_MS: u64 = 1_000;
/// How long one request to one endpoint may take in total.
pub const ETCD_TIMEOUT_REQUEST_MS: u64 = 3_000;
/// Largest answer we read from etcd.
const ANSWER_BYTES_MAX: u64 = 1 << 20;

/// The tiebreaker on etcd.
#[derive(Clone, Debug)]
pub struct EtcdTiebreaker {
    endpoints: Vec<String>,
    agent: ureq::Agent,
}

impl EtcdTiebreaker {
    /// `endpoints` are client URLs such as `http://10.0.0.5:2379` (a bare `host:port` means
    /// `http://host:port`). TLS is not supported.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, TiebreakError> {
        let timeouts = (
            Duration::from_millis(ETCD_TIMEOUT_CONNECT_MS),
            Duration::from_millis(ETCD_TIMEOUT_REQUEST_MS),
        );
        Self::with_timeouts(endpoints, timeouts.0, timeouts.1)
    }

    /// Like [`EtcdTiebreaker::new`] with explicit timeouts.
    pub fn with_timeouts<S: AsRef<str>>(
        endpoints: &[S],
        connect: Duration,
        request: Duration,
    ) -> Result<Self, TiebreakError> {
        if endpoints.is_empty() {
            return Err(TiebreakError::EtcdConfig("no endpoints were given".into()));
        }
        let endpoints = endpoints
            .iter()
            .map(|e| normalise_endpoint(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout(request)
            // A proxy in the environment must not sit between us and the tiebreaker.
            .try_proxy_from_env(false)
            .build();
        Ok(EtcdTiebreaker { endpoints, agent })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sends `body` to `path` on each endpoint in turn until one answers with JSON.
    fn call(&self, path: &str, body: &Value) -> Result<(String, Value), TiebreakError> {
        let body = body.to_string();
        let mut attempts = Vec::new();
        for endpoint in &self.endpoints {
            let url = format!("{endpoint}{path}");
            let answer = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json")
                .send_string(&body);
            let response = match answer {
                Ok(response) => response,
                Err(ureq::Error::Status(code, response)) => {
                    let text = read_body(response).unwrap_or_default();
                    attempts.push(format!("{url} answered HTTP {code}: {}", text.trim()));
                    continue;
                }
                Err(ureq::Error::Transport(t)) => {
                    attempts.push(format!("{url} could not be reached: {t}"));
                    continue;
                }
            };
            let text = match read_body(response) {
                Ok(text) => text,
                Err(e) => {
                    attempts.push(format!("{url} broke off its answer: {e}"));
                    continue;
                }
            };
            let value = serde_json::from_str(&text).map_err(|e| TiebreakError::EtcdProtocol {
                endpoint: endpoint.clone(),
                what: format!("the answer is not JSON ({e}): {text:.200}"),
            })?;
            return Ok((endpoint.clone(), value));
        }
        Err(TiebreakError::EtcdUnreachable {
            attempts: attempts.join("; "),
        })
    }
}

impl TestAndSet for EtcdTiebreaker {
    fn test_and_set(&self, vm_id: &str, epoch: u64, owner: &str) -> Result<Outcome, TiebreakError> {
        validate_claim(vm_id, epoch, owner)?;
        let key = B64.encode(claim_key(vm_id, epoch));
        let request = json!({
            "compare": [{
                "key": key,
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": "0",
            }],
            "success": [{ "request_put": { "key": key, "value": B64.encode(owner) } }],
            "failure": [{ "request_range": { "key": key } }],
        });
        let (endpoint, answer) = self.call("/v3/kv/txn", &request)?;
        let bad = |what: &str| TiebreakError::EtcdProtocol {
            endpoint: endpoint.clone(),
            what: format!("{what} in the transaction answer {answer}"),
        };
        if answer.get("header").is_none() {
            return Err(bad("no header"));
        }
        if answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return Ok(Outcome::Won);
        }
        let kv = answer
            .pointer("/responses/0/response_range/kvs/0")
            .ok_or_else(|| bad("a failed comparison but no holder"))?;
        let holder = decode_text(kv.get("value")).ok_or_else(|| bad("an unreadable holder"))?;
        Ok(outcome_for(holder, owner))
    }

    fn current(&self, vm_id: &str) -> Result<Option<(u64, String)>, TiebreakError> {
        validate_vm_id(vm_id)?;
        let prefix = claims_prefix(vm_id);
        let request = json!({
            "key": B64.encode(&prefix),
            "range_end": B64.encode(prefix_end(prefix.as_bytes())),
            "limit": "1",
            "sort_order": "DESCEND",
            "sort_target": "KEY",
        });
        let Some((kv, bad)) = self.range_first(&request)? else {
            return Ok(None);
        };
        let key = decode_text(kv.get("key")).ok_or_else(|| bad("an unreadable key"))?;
        let epoch = key
            .strip_prefix(&prefix)
            .and_then(parse_epoch_digits)
            .ok_or_else(|| bad("a key that is not a claim"))?;
        let holder = decode_text(kv.get("value")).ok_or_else(|| bad("an unreadable holder"))?;
        Ok(Some((epoch, holder)))
    }

    fn beat(&self, vm_id: &str, beat: &Beat) -> Result<(), TiebreakError> {
        validate_claim(vm_id, beat.epoch, &beat.owner)?;
        let request = json!({
            "key": B64.encode(beat_key(vm_id)),
            "value": B64.encode(beat.encode()),
        });
        let (endpoint, answer) = self.call("/v3/kv/put", &request)?;
        if answer.get("header").is_none() {
            return Err(TiebreakError::EtcdProtocol {
                endpoint,
                what: format!("no header in the put answer {answer}"),
            });
        }
        Ok(())
    }

    fn last_beat(&self, vm_id: &str) -> Result<Option<Beat>, TiebreakError> {
        validate_vm_id(vm_id)?;
        let request = json!({ "key": B64.encode(beat_key(vm_id)) });
        let Some((kv, bad)) = self.range_first(&request)? else {
            return Ok(None);
        };
        decode_text(kv.get("value"))
            .as_deref()
            .and_then(Beat::decode)
            .map(Some)
            .ok_or_else(|| bad("an unreadable beat"))
    }
}

/// Builds the protocol error for a part of an answer we do not understand.
type Bad = Box<dyn Fn(&str) -> TiebreakError>;

impl EtcdTiebreaker {
    /// A range request: its first key-value pair (`None`: no key matched), with the error maker
    /// for the rest of the caller's reading of it.
    fn range_first(&self, request: &Value) -> Result<Option<(Value, Bad)>, TiebreakError> {
        let (endpoint, answer) = self.call("/v3/kv/range", request)?;
        let text = answer.to_string();
        let bad: Bad = Box::new(move |what: &str| TiebreakError::EtcdProtocol {
            endpoint: endpoint.clone(),
            what: format!("{what} in the range answer {text}"),
        });
        if answer.get("header").is_none() {
            return Err(bad("no header"));
        }
        Ok(answer.pointer("/kvs/0").cloned().map(|kv| (kv, bad)))
    }
}

/// The liveness record's key: outside every VM's claims range (`.../epoch/`).
fn beat_key(vm_id: &str) -> String {
    format!("{ETCD_KEY_PREFIX}{vm_id}/beat")
}

fn claims_prefix(vm_id: &str) -> String {
    format!("{ETCD_KEY_PREFIX}{vm_id}/epoch/")
}

fn claim_key(vm_id: &str, epoch: u64) -> String {
    format!("{}{}", claims_prefix(vm_id), epoch_digits(epoch))
}

/// The smallest key above every key that starts with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    // Our prefixes end in '/', never in 0xff, so adding one to the last byte never carries.
    let last = end.last_mut().expect("a claims prefix is never empty");
    assert!(*last < 0xff, "claims prefix ends in 0xff");
    *last += 1;
    end
}

fn decode_text(field: Option<&Value>) -> Option<String> {
    let bytes = B64.decode(field?.as_str()?).ok()?;
    String::from_utf8(bytes).ok()
}

fn read_body(response: ureq::Response) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    response
        .into_reader()
        .take(ANSWER_BYTES_MAX)
        .read_to_string(&mut text)?;
    Ok(text)
}

fn normalise_endpoint(endpoint: &str) -> Result<String, TiebreakError> {
    let endpoint = endpoint.trim().trim_end_matches('/');
    if endpoint.is_empty() {
        return Err(TiebreakError::EtcdConfig("an endpoint is empty".into()));
    }
    if endpoint.starts_with("https://") {
        return Err(TiebreakError::EtcdConfig(format!(
            "endpoint {endpoint} uses https, which this build does not support; use http://"
        )));
    }
    if endpoint.starts_with("http://") {
        Ok(endpoint.to_string())
    } else if endpoint.contains("://") {
        Err(TiebreakError::EtcdConfig(format!(
            "endpoint {endpoint} is not an http:// URL or a host:port"
        )))
    } else {
        Ok(format!("http://{endpoint}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_epoch_and_stay_inside_their_vm() {
        assert_eq!(claim_key("vm1", 7), "ftvm/vm1/epoch/00000000000000000007");
        let prefix = claims_prefix("vm1");
        let end = String::from_utf8(prefix_end(prefix.as_bytes())).unwrap();
        assert_eq!(end, "ftvm/vm1/epoch0");
        assert!(claim_key("vm1", u64::MAX) < end);
        // "vm1" must not see "vm10"'s claims.
        assert!(!claim_key("vm10", 1).starts_with(&prefix));
    }

    #[test]
    fn endpoints_are_normalised_and_checked() {
        let tb = EtcdTiebreaker::new(&["127.0.0.1:2379", "http://h:1/"]).unwrap();
        assert_eq!(tb.endpoints(), ["http://127.0.0.1:2379", "http://h:1"]);
        assert!(EtcdTiebreaker::new::<&str>(&[]).is_err());
        assert!(EtcdTiebreaker::new(&["https://h:1"]).is_err());
        assert!(EtcdTiebreaker::new(&["unix://x"]).is_err());
    }

    #[test]
    fn an_unreachable_cluster_is_a_transient_error_naming_each_endpoint() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let tb = EtcdTiebreaker::new(&["127.0.0.1:1", "127.0.0.2:1"]).unwrap();
        let err = tb.test_and_set("vm1", 1, "a").unwrap_err();
        assert!(err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(text.contains("http://127.0.0.1:1/v3/kv/txn"), "{text}");
        assert!(text.contains("http://127.0.0.2:1/v3/kv/txn"), "{text}");
        assert!(tb.current("vm1").unwrap_err().is_transient());
    }
}
