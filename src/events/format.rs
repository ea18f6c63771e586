//! The two wire formats: CloudEvents 1.0 (JSON; structured mode for one event, batched mode for
//! several) and the reference registry's notification envelope (`distribution`), so consumers
//! written for it work unchanged.

use serde_json::{Value, json};

use super::{Format, RequestInfo};
use crate::meta::StoredEvent;

/// What a payload says about where it comes from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The registry's URL as clients know it (`events.registry_url`), if configured.
    pub registry_url: Option<String>,
    /// The delivering replica, for events no request made (collections).
    pub instance: String,
}

/// The body of one request carrying `events`, with its content type.
pub fn render(format: Format, events: &[StoredEvent], source: &Source) -> (&'static str, Vec<u8>) {
    match format {
        Format::CloudEvents if events.len() == 1 => {
            ("application/cloudevents+json", cloud_event(&events[0], source).to_string().into_bytes())
        }
        Format::CloudEvents => {
            let batch: Vec<Value> = events.iter().map(|e| cloud_event(e, source)).collect();
            ("application/cloudevents-batch+json", Value::Array(batch).to_string().into_bytes())
        }
        Format::Distribution => {
            let list: Vec<Value> = events.iter().map(|e| distribution_event(e, source)).collect();
            (
                "application/vnd.docker.distribution.events.v1+json",
                json!({ "events": list }).to_string().into_bytes(),
            )
        }
    }
}

fn request_of(e: &StoredEvent) -> Option<RequestInfo> {
    e.request.as_deref().and_then(|r| serde_json::from_str(r).ok())
}

/// The registry's base URL for `e`: configured, else the host its request named.
fn base_url(e: &StoredEvent, source: &Source) -> Option<String> {
    source
        .registry_url
        .clone()
        .or_else(|| request_of(e).filter(|r| !r.host.is_empty()).map(|r| format!("http://{}", r.host)))
}

/// The event as CloudEvents 1.0 JSON (structured mode).
pub fn cloud_event(e: &StoredEvent, source: &Source) -> Value {
    let subject = match (&e.repository, &e.tag, &e.digest) {
        (Some(r), Some(t), _) => Some(format!("{r}:{t}")),
        (Some(r), None, Some(d)) => Some(format!("{r}@{d}")),
        (Some(r), None, None) => Some(r.clone()),
        (None, _, Some(d)) => Some(d.clone()),
        (None, _, None) => None,
    };
    let mut data = json!({
        "repository": e.repository,
        "digest": e.digest,
        "mediaType": e.media_type,
        "size": e.size,
        "tag": e.tag,
        "oldDigest": e.old_digest,
        "actor": e.actor,
        "stream": e.repository.clone().unwrap_or_else(|| e.stream.clone()),
        "sequence": e.seq,
    });
    if let Some(map) = data.as_object_mut() {
        map.retain(|_, v| !v.is_null());
        if let Some(r) = request_of(e) {
            map.insert("request".into(), serde_json::to_value(r).unwrap_or(Value::Null));
        }
        if let Some(d) = e.detail.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()) {
            map.insert("detail".into(), d);
        }
    }
    let mut event = json!({
        "specversion": "1.0",
        "id": e.id.to_string(),
        "source": source.registry_url.clone().unwrap_or_else(|| "berth".to_string()),
        "type": format!("berth.{}", e.kind),
        "time": crate::time::utc_millis(e.at),
        "datacontenttype": "application/json",
        "data": data,
    });
    if let (Some(s), Some(map)) = (subject, event.as_object_mut()) {
        map.insert("subject".into(), Value::String(s));
    }
    event
}

/// The reference registry's action for `kind`: push, pull or delete where one applies, else
/// Berth's own kind.
fn action_of(kind: &str) -> &str {
    match kind {
        super::MANIFEST_PUSHED | super::TAG_SET => "push",
        super::MANIFEST_PULLED => "pull",
        super::MANIFEST_DELETED | super::TAG_DELETED | super::BLOB_DELETED => "delete",
        other => other,
    }
}

/// The event in the reference registry's envelope.
pub fn distribution_event(e: &StoredEvent, source: &Source) -> Value {
    let request = request_of(e);
    let base = base_url(e, source);
    let url = match (&base, &e.repository, &e.digest) {
        (Some(b), Some(r), Some(d)) => {
            let what = if e.kind.starts_with("blob.") { "blobs" } else { "manifests" };
            Some(format!("{}/v2/{r}/{what}/{d}", b.trim_end_matches('/')))
        }
        _ => None,
    };
    let mut target = json!({
        "mediaType": e.media_type,
        "size": e.size,
        "digest": e.digest,
        "length": e.size,
        "repository": e.repository,
        "url": url,
        "tag": e.tag,
    });
    if let Some(map) = target.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    let (addr, instance) = match &request {
        Some(r) => (r.host.clone(), r.instance.clone()),
        None => (String::new(), source.instance.clone()),
    };
    json!({
        "id": e.id.to_string(),
        "timestamp": crate::time::utc_millis(e.at),
        "action": action_of(&e.kind),
        "target": target,
        "request": request.as_ref().map(|r| json!({
            "id": r.id,
            "addr": r.addr,
            "host": r.host,
            "method": r.method,
            "useragent": r.useragent,
        })).unwrap_or_else(|| json!({})),
        "actor": { "name": e.actor.clone().unwrap_or_default() },
        "source": { "addr": addr, "instanceID": instance },
    })
}
