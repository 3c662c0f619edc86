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
//! The liveness record ([`Beat`]) is two keys outside the claims' range:
//! - `ftvm/V/beat`, a plain put of the beat that started a primary's run (and of its last word,
//!   "stopped"): who ran last, kept until the next run overwrites it;
//! - `ftvm/V/alive`, bound to a lease of [`BEAT_LEASE_TTL_S`] that every later beat of the same
//!   run only keeps alive. A keepalive is not a write to the key space, so a running primary adds
//!   no revisions; etcd deletes the key when the beats stop for the lease's TTL.
//!
//! Both are written together, in one transaction, when a run starts (a new epoch or owner), when
//! its lease ran out (a primary that was paused, or cut off from etcd, for longer than the TTL),
//! or when another writer replaced them (a deposed primary's last beat). So a VM adds a revision or two per run, not one per beat: the earlier one-put-per-beat
//! scheme added about 134 bytes of etcd 3.4's database a second, which only a compaction freed.
//! A starter of a new pair ([`TestAndSet::beats_again`]) takes a present `alive` key, after
//! waiting longer than its lease's TTL, as a running primary. This crate never compacts:
//! compaction is cluster-wide, an operator's decision (a cluster should still run with
//! auto-compaction, for the claims of many epochs).
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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::{
    epoch_digits, outcome_for, parse_epoch_digits, validate_claim, validate_vm_id, Beat, Outcome,
    TestAndSet, TiebreakError, BEAT_STOPPED,
};

/// Every key this crate writes starts with this.
pub const ETCD_KEY_PREFIX: &str = "ftvm/";
/// How long to wait for a TCP connection to one endpoint.
pub const ETCD_TIMEOUT_CONNECT_MS: u64 = 1_000;
/// How long one request to one endpoint may take in total.
pub const ETCD_TIMEOUT_REQUEST_MS: u64 = 3_000;
/// Largest answer we read from etcd.
const ANSWER_BYTES_MAX: u64 = 1 << 20;
/// The TTL asked for the lease of a primary's `alive` key: three beats at ftvm's one a second, so
/// one slow answer from etcd does not make a running primary look stopped. (etcd may grant more:
/// its floor is 1.5 times its election timeout; the starter reads the granted TTL.)
pub const BEAT_LEASE_TTL_S: u64 = 3;
/// How much longer than the lease's granted TTL a starter waits before it reads `alive` again.
pub const BEAT_LEASE_MARGIN_MS: u64 = 500;
/// The longest granted TTL a starter waits out; a longer one is taken as this (the wait is then
/// too short to see a stopped primary's key go, so such a primary looks alive: the safe side).
pub const BEAT_LEASE_WAIT_MAX_S: u64 = 60;

/// The lease that this process's beats keep alive: one run (VM, epoch, owner) at a time.
#[derive(Clone, Debug)]
struct BeatLease {
    vm_id: String,
    epoch: u64,
    owner: String,
    id: String,
}

/// The tiebreaker on etcd.
#[derive(Clone, Debug)]
pub struct EtcdTiebreaker {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// Shared by clones, so that they keep one lease alive rather than each granting its own.
    lease: Arc<Mutex<Option<BeatLease>>>,
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
        Ok(EtcdTiebreaker {
            endpoints,
            agent,
            lease: Arc::new(Mutex::new(None)),
        })
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

    /// The first beat of a run writes `beat` and a leased `alive`; later ones keep the lease
    /// alive (and write the record again only if another writer replaced it); "stopped"
    /// overwrites `beat` and lets the lease go.
    fn beat(&self, vm_id: &str, beat: &Beat) -> Result<(), TiebreakError> {
        validate_claim(vm_id, beat.epoch, &beat.owner)?;
        let mut held = self.lease.lock().expect("beat lease lock");
        if beat.count == BEAT_STOPPED {
            self.put_record(vm_id, beat, None)?;
            if let Some(lease) = held.take() {
                // Best effort: unrevoked, the lease and its key end with the TTL anyway.
                let _ = self.call("/v3/lease/revoke", &json!({ "ID": lease.id }));
            }
            return Ok(());
        }
        let same_run =
            |l: &&BeatLease| l.vm_id == vm_id && l.epoch == beat.epoch && l.owner == beat.owner;
        if let Some(lease) = held.as_ref().filter(same_run) {
            if self.keep_alive(&lease.id)? {
                if self.alive_lease(vm_id)?.as_deref() == Some(lease.id.as_str()) {
                    return Ok(());
                }
                // Another writer's record replaced ours (a deposed primary's last beat before
                // it halted, say): ours again, as a put-per-beat record would be.
                return self.put_record(vm_id, beat, Some(&lease.id));
            }
            // It ran out (we were paused or cut off longer than its TTL), and etcd deleted
            // `alive` with it: a new lease below, and the record again.
        }
        *held = None;
        let id = self.grant(BEAT_LEASE_TTL_S)?;
        self.put_record(vm_id, beat, Some(&id))?;
        *held = Some(BeatLease {
            vm_id: vm_id.to_string(),
            epoch: beat.epoch,
            owner: beat.owner.clone(),
            id,
        });
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

    /// A primary that beats keeps `alive`; one that stopped beating loses it within its lease's
    /// TTL, so the key is read again after waiting out the TTL that etcd granted.
    fn beats_again(
        &self,
        vm_id: &str,
        _first: &Beat,
        wait: Duration,
    ) -> Result<Option<Beat>, TiebreakError> {
        validate_vm_id(vm_id)?;
        let granted_s = match self.alive_lease(vm_id)? {
            Some(id) => self.granted_ttl_s(&id)?,
            None => 0,
        };
        let lease_wait = Duration::from_secs(granted_s.min(BEAT_LEASE_WAIT_MAX_S))
            + Duration::from_millis(BEAT_LEASE_MARGIN_MS);
        std::thread::sleep(wait.max(lease_wait));
        if self.alive_lease(vm_id)?.is_none() {
            return Ok(None);
        }
        Ok(self.last_beat(vm_id)?.filter(|b| b.count != BEAT_STOPPED))
    }
}

/// Builds the protocol error for a part of an answer we do not understand.
type Bad = Box<dyn Fn(&str) -> TiebreakError>;

impl EtcdTiebreaker {
    /// Writes `beat` to `ftvm/V/beat` and, with `lease`, `ftvm/V/alive` bound to it, in one
    /// transaction.
    fn put_record(
        &self,
        vm_id: &str,
        beat: &Beat,
        lease: Option<&str>,
    ) -> Result<(), TiebreakError> {
        let mut puts = vec![json!({ "request_put": {
            "key": B64.encode(beat_key(vm_id)),
            "value": B64.encode(beat.encode()),
        } })];
        if let Some(id) = lease {
            puts.push(json!({ "request_put": {
                "key": B64.encode(alive_key(vm_id)),
                "value": B64.encode(beat.encode()),
                "lease": id,
            } }));
        }
        let (endpoint, answer) = self.call("/v3/kv/txn", &json!({ "success": puts }))?;
        if answer.get("header").is_none() {
            return Err(TiebreakError::EtcdProtocol {
                endpoint,
                what: format!("no header in the beat's transaction answer {answer}"),
            });
        }
        Ok(())
    }

    /// A new lease of (at least) `ttl_s` seconds: its id.
    fn grant(&self, ttl_s: u64) -> Result<String, TiebreakError> {
        let (endpoint, answer) =
            self.call("/v3/lease/grant", &json!({ "TTL": ttl_s.to_string() }))?;
        match (
            answer.get("ID").and_then(Value::as_str),
            answer.get("error"),
        ) {
            (Some(id), None) => Ok(id.to_string()),
            _ => Err(TiebreakError::EtcdProtocol {
                endpoint,
                what: format!("no lease in the grant answer {answer}"),
            }),
        }
    }

    /// Keeps lease `id` alive: false if it had run out already.
    fn keep_alive(&self, id: &str) -> Result<bool, TiebreakError> {
        let (endpoint, answer) = self.call("/v3/lease/keepalive", &json!({ "ID": id }))?;
        let Some(result) = answer.get("result") else {
            return Err(TiebreakError::EtcdProtocol {
                endpoint,
                what: format!("no result in the keepalive answer {answer}"),
            });
        };
        // An expired lease's answer has no TTL (the gateway leaves out zero values).
        Ok(int_field(result, "TTL").unwrap_or(0) > 0)
    }

    /// The id of the lease `ftvm/V/alive` is bound to, if the key exists.
    fn alive_lease(&self, vm_id: &str) -> Result<Option<String>, TiebreakError> {
        let request = json!({ "key": B64.encode(alive_key(vm_id)) });
        let Some((kv, bad)) = self.range_first(&request)? else {
            return Ok(None);
        };
        kv.get("lease")
            .and_then(Value::as_str)
            .map(|id| Some(id.to_string()))
            .ok_or_else(|| bad("an `alive` key without a lease"))
    }

    /// The TTL etcd granted lease `id`, in seconds (0 if the lease is gone).
    fn granted_ttl_s(&self, id: &str) -> Result<u64, TiebreakError> {
        let (endpoint, answer) = self.call("/v3/lease/timetolive", &json!({ "ID": id }))?;
        if answer.get("header").is_none() {
            return Err(TiebreakError::EtcdProtocol {
                endpoint,
                what: format!("no header in the time-to-live answer {answer}"),
            });
        }
        Ok(int_field(&answer, "grantedTTL").unwrap_or(0).max(0) as u64)
    }

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

/// The leased key that exists while the VM's primary beats: outside the claims' range too.
fn alive_key(vm_id: &str) -> String {
    format!("{ETCD_KEY_PREFIX}{vm_id}/alive")
}

/// A 64-bit integer field of a gateway answer (written as a string, or as a number).
fn int_field(value: &Value, name: &str) -> Option<i64> {
    match value.get(name)? {
        Value::String(s) => s.parse().ok(),
        v => v.as_i64(),
    }
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
