//! Group commit: requests from many tasks are collected and sent to the backend together.
//!
//! A batcher task takes whatever requests queued up while the previous batch ran, up to a
//! maximum, and hands them to one backend call, so that on SQLite one transaction carries
//! many tasks' writes. Under light load a batch has one request and adds no delay.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{Error, Result};

type Request<Item, Reply> = (Item, oneshot::Sender<Result<Reply>>);

/// Handle that sends one request to a batcher task and waits for its reply.
pub struct Batcher<Item, Reply> {
    requests: mpsc::Sender<Request<Item, Reply>>,
}

impl<Item, Reply> Clone for Batcher<Item, Reply> {
    fn clone(&self) -> Self {
        Batcher {
            requests: self.requests.clone(),
        }
    }
}

impl<Item: Send + 'static, Reply: Send + 'static> Batcher<Item, Reply> {
    /// Starts a batcher task that calls `commit` with up to `max_batch` items at a time.
    /// `commit` returns one reply per item, in order, or one error for the whole batch.
    /// The task ends when every handle is dropped.
    pub fn spawn<Commit, Fut>(
        name: &'static str,
        max_batch: usize,
        commit: Commit,
    ) -> (Self, JoinHandle<()>)
    where
        Commit: Fn(Vec<Item>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Reply>>> + Send,
    {
        let (requests, mut receiver) = mpsc::channel::<Request<Item, Reply>>(max_batch * 4);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max_batch);
            while receiver.recv_many(&mut batch, max_batch).await > 0 {
                let (items, replies): (Vec<Item>, Vec<_>) = batch.drain(..).unzip();
                let count = items.len();
                match commit(items).await {
                    Ok(results) if results.len() == count => {
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Ok(results) => {
                        tracing::error!(
                            batch = name,
                            expected = count,
                            got = results.len(),
                            "backend returned the wrong number of results"
                        );
                        for reply in replies {
                            let _ = reply.send(Err(Error::Invalid(format!(
                                "{name}: the backend returned {} results for {count} requests",
                                results.len()
                            ))));
                        }
                    }
                    Err(error) => {
                        tracing::error!(batch = name, requests = count, %error, "batch failed");
                        let message = error.to_string();
                        for reply in replies {
                            let _ = reply
                                .send(Err(Error::Invalid(format!("{name} failed: {message}"))));
                        }
                    }
                }
            }
        });
        (Batcher { requests }, task)
    }

    /// Sends one item and waits until its batch has been committed.
    pub async fn call(&self, item: Item) -> Result<Reply> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((item, reply))
            .await
            .map_err(|_| Error::Invalid("the batcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Invalid("the batcher dropped the request".into()))?
    }
}
