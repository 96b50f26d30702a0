//! The Microsoft identity platform token endpoint (client credentials with a client secret or a
//! client assertion), answering errors in Entra's AADSTS shape.

use std::collections::HashMap;

use axum::http::StatusCode;

use crate::Behaviour;
use crate::aad::{AadError, aad};
use crate::assertion::{self, Issuer, Kind};
use crate::devices::is_guid;

/// The app registration a token request must match: its tenant (any GUID when `None`), its
/// client id, and the cluster issuer whose tokens its federated credential trusts.
pub(crate) struct App {
    pub tenant_id: Option<String>,
    pub client_id: String,
    pub issuer: Issuer,
}

/// The urlencoded form fields of a token request.
pub(crate) type Form = HashMap<String, String>;

fn missing(param: &str) -> AadError {
    aad(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        format!("The request body must contain the following parameter: '{param}'."),
    )
}

/// Checks a token request in the order Entra does: service, tenant, grant, client, scope, then
/// the secret or assertion sent to `token_url`; tells which kind of credential passed.
pub(crate) fn validate(
    cfg: &App,
    b: &Behaviour,
    tenant: &str,
    token_url: &str,
    form: &Form,
) -> Result<Kind, AadError> {
    let field = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    if b.token_outage {
        return Err(aad(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.".into(),
        ));
    }
    let own_app = b.tenants.get(&tenant.to_ascii_lowercase());
    let known_tenant = own_app.is_some()
        || cfg
            .tenant_id
            .as_deref()
            .map_or(is_guid(tenant), |t| t.eq_ignore_ascii_case(tenant));
    if !known_tenant {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and \
                 are signing into the correct cloud."
            ),
        ));
    }
    match field("grant_type").ok_or_else(|| missing("grant_type"))? {
        "client_credentials" => {}
        other => {
            return Err(aad(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{other}'."),
            ));
        }
    }
    let client_id = field("client_id").ok_or_else(|| missing("client_id"))?;
    let (app_id, app_secret) = own_app.map_or((&cfg.client_id, &b.client_secret), |app| {
        (&app.client_id, &app.client_secret)
    });
    if !client_id.eq_ignore_ascii_case(app_id) {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. \
                 This can happen if the application has not been installed by the administrator of \
                 the tenant or consented to by any user in the tenant. You may have sent your \
                 authentication request to the wrong tenant."
            ),
        ));
    }
    let scope = field("scope").ok_or_else(|| missing("scope"))?;
    if !scope.ends_with("/.default") {
        return Err(aad(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows must \
                 have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        ));
    }
    let invalid_client = |code, description: String| {
        Err(aad(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            code,
            description,
        ))
    };
    if let (None, Some(client_assertion)) = (field("client_secret"), field("client_assertion")) {
        let kind = field("client_assertion_type");
        return assertion::verify(&cfg.issuer, b, client_id, token_url, kind, client_assertion);
    }
    match field("client_secret") {
        None => invalid_client(
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'."
                .into(),
        ),
        Some(secret) if secret != app_secret => invalid_client(
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the \
                 client secret value, not the client secret ID, for a secret added to app \
                 '{client_id}'."
            ),
        ),
        Some(_) => Ok("secret"),
    }
}
