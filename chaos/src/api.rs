//! The control plane's HTTP API as the suite's workloads use it: every call goes to one
//! replica and, when that one does not answer, to the other (as a load balancer would).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::Value;

pub struct Api {
    pub replicas: Vec<String>,
    token: String,
    next: AtomicUsize,
}

/// An agent as `GET /api/v1/agents` shows it.
#[derive(Clone, Debug)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub online: bool,
    /// Rows still in its buffer, from its last heartbeat.
    pub buffered: Option<i64>,
}

/// What one call got: the status and the JSON body (`null` when there was none), or no
/// answer at all.
pub type Answer = Result<(StatusCode, Value), String>;

impl Api {
    pub async fn login(replicas: Vec<String>, user: &str, password: &str) -> anyhow::Result<Api> {
        let mut api = Api {
            replicas,
            token: String::new(),
            next: AtomicUsize::new(0),
        };
        let body = serde_json::json!({"username": user, "password": password});
        let (status, answer) = api
            .call(Method::POST, "/api/v1/sessions", Some(body))
            .await
            .map_err(anyhow::Error::msg)?;
        if !status.is_success() {
            bail!("login: {status} {answer}");
        }
        api.token = answer["token"]
            .as_str()
            .context("login answered without a token")?
            .to_string();
        Ok(api)
    }

    /// Call `path` on the next replica, falling over to the other when it does not answer.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..self.replicas.len() {
            let replica = &self.replicas[(first + i) % self.replicas.len()];
            match self
                .call_on(replica, method.clone(), path, body.clone())
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Call `path` on `replica` only.
    pub async fn call_on(
        &self,
        replica: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let url = url::Url::parse(&format!("http://{replica}{path}")).map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        if !self.token.is_empty() {
            let value = HeaderValue::from_str(&format!("Bearer {}", self.token))
                .map_err(|e| e.to_string())?;
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let body = match body {
            Some(v) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                bytes::Bytes::from(v.to_string())
            }
            None => bytes::Bytes::new(),
        };
        let response = world::http_request(
            &world::World::real(),
            method,
            &url,
            headers,
            body,
            Duration::from_secs(15),
            16 << 20,
        )
        .await
        .map_err(|e| format!("{replica}: {e}"))?;
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        Ok((response.status, value))
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub async fn agents(&self) -> anyhow::Result<Vec<AgentView>> {
        let (status, body) = self
            .call(Method::GET, "/api/v1/agents", None)
            .await
            .map_err(anyhow::Error::msg)?;
        if !status.is_success() {
            bail!("list agents: {status}");
        }
        Ok(body
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|a| AgentView {
                        id: a["id"].as_str().unwrap_or_default().to_string(),
                        name: a["name"].as_str().unwrap_or_default().to_string(),
                        online: a["status"] == "online",
                        buffered: a["buffer"]["rows"].as_i64(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}
