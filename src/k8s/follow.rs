//! Following one named object: the tasks that apply a Secret or a ConfigMap the spec names
//! (passwords, WAL archive credentials, custom queries) all watch the object by name, and
//! start over when the spec names another one.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::{Shared, WATCH_TIMEOUT};

/// Runs `follow` on the current value of `source` until the value changes, then on the new
/// one; while there is none, runs `none` once and waits. Ends when `source`'s sender is gone.
pub async fn current<T, F, Fut>(
    mut source: watch::Receiver<Option<T>>,
    mut follow: F,
    mut none: impl FnMut(),
) where
    T: Clone,
    F: FnMut(T) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let value = source.borrow_and_update().clone();
        match value {
            Some(v) => {
                tokio::select! {
                    () = follow(v) => {}
                    _ = source.changed() => {}
                }
            }
            None => {
                none();
                if source.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Every version of the object `name` of `api` as it is applied, from a watch that reconnects
/// with backoff; each result also tells `shared` whether the API server answered.
pub fn named<K>(
    api: Api<K>,
    name: &str,
    shared: Arc<Shared>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let cfg = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_TIMEOUT.as_secs() as u32);
    watcher(api, cfg)
        .default_backoff()
        .applied_objects()
        .inspect(move |result| shared.api_result(result))
}

/// What a watch of one named object saw.
#[derive(Debug)]
pub enum Seen<K> {
    /// It exists, in this version.
    Applied(K),
    /// It does not exist: deleted, or not there when the watch (re)started.
    Gone,
}

/// [`named`], telling also when the object is gone: a deletion the watch saw, or a (re)list
/// without it (a deletion while the watch was down has no event of its own).
pub fn named_or_gone<K>(
    api: Api<K>,
    name: &str,
    shared: Arc<Shared>,
) -> impl Stream<Item = Result<Seen<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let cfg = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_TIMEOUT.as_secs() as u32);
    let mut listed = false;
    watcher(api, cfg)
        .default_backoff()
        .filter_map(move |event| {
            let seen = match event {
                Ok(watcher::Event::Init) => {
                    listed = false;
                    None
                }
                Ok(watcher::Event::InitApply(o)) => {
                    listed = true;
                    Some(Ok(Seen::Applied(o)))
                }
                Ok(watcher::Event::Apply(o)) => Some(Ok(Seen::Applied(o))),
                Ok(watcher::Event::Delete(_)) => Some(Ok(Seen::Gone)),
                Ok(watcher::Event::InitDone) => (!listed).then_some(Ok(Seen::Gone)),
                Err(e) => Some(Err(e)),
            };
            std::future::ready(seen)
        })
        .inspect(move |result| shared.api_result(result))
}
