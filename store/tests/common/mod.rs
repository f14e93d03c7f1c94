//! An S3 server in the test process: s3s-fs over a temporary directory with bucket `bucket`,
//! behind any hyper service (so a test can put a failing front before it).

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;

/// Credentials the server accepts.
pub const ACCESS_KEY: &str = "test-access";
/// Credentials the server accepts.
pub const SECRET_KEY: &str = "test-secret";

/// The s3s-fs service over `root`, which gets a `bucket` directory.
pub fn s3_service(root: &std::path::Path) -> s3s::service::S3Service {
    std::fs::create_dir_all(root.join("bucket")).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    builder.build()
}

/// Serves `service` on a local port; returns its `http://` endpoint and the accept loop.
pub async fn serve<S>(service: S) -> (String, tokio::task::JoinHandle<()>)
where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<s3s::Body>,
            Error = s3s::HttpError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { break };
            let service = service.clone();
            tokio::spawn(async move {
                let _ = ConnBuilder::new(TokioExecutor::new()).serve_connection(TokioIo::new(socket), service).await;
            });
        }
    });
    (format!("http://{addr}"), server)
}

/// object_store options for the server at `endpoint` with `secret` as the secret key.
pub fn options<'a>(endpoint: &'a str, secret: &'a str) -> [(&'static str, &'a str); 5] {
    [
        ("aws_endpoint", endpoint),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", ACCESS_KEY),
        ("aws_secret_access_key", secret),
        ("aws_region", "us-east-1"),
    ]
}
