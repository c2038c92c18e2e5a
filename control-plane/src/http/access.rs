//! The access level every route declares (a leaf, so the route table and the OpenAPI document
//! both read it without knowing each other).

use axum::http::Method;

use crate::auth::Role;

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credentials (login, health, enrollment: it carries its own token).
    Public,
    /// A logged-in user with at least this role (cookie or `Authorization: Bearer`).
    User(Role),
    /// An enrolled agent presenting its credential as a bearer token.
    Agent,
}

#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}
