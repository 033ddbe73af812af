//! A real S3-protocol server (s3s-fs) serving a local folder, started inside the current
//! process. `sidbooth dev` and the tests use it so that storage goes through the same
//! aws-sdk-s3 client and HTTP as in production.

use std::{io, net::SocketAddr, path::Path};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder as ConnBuilder,
};
use s3s::{auth::SimpleAuth, service::S3ServiceBuilder};
use tokio::{net::TcpListener, task::JoinHandle};

/// A running embedded server. Dropping it stops accepting connections.
pub struct EmbeddedS3 {
    addr: SocketAddr,
    access_key: String,
    secret_key: String,
    accept_loop: JoinHandle<()>,
}

impl EmbeddedS3 {
    /// Serves `root` on `bind` (use port 0 for any free port) with one access/secret key pair.
    pub async fn start(
        root: &Path,
        bind: SocketAddr,
        access_key: &str,
        secret_key: &str,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| io::Error::other(format!("{e:?}")))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(access_key, secret_key));
        let service = builder.build();

        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let accept_loop = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let socket = match listener.accept().await {
                    Ok((socket, _)) => socket,
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded S3: accept failed");
                        continue;
                    }
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self {
            addr,
            access_key: access_key.to_owned(),
            secret_key: secret_key.to_owned(),
            accept_loop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}
