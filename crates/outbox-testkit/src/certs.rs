//! Certificates for TLS tests, made with the `openssl` CLI in a temp dir: a
//! CA, a server certificate for `localhost` only (so `127.0.0.1` is a host
//! name mismatch), a client certificate, and a second CA nobody trusts.

use super::HarnessError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and what it signed, removed on drop.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    pub fn generate() -> Result<Certs, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("outbox-tailer-certs-")
            .tempdir()
            .map_err(HarnessError::io("creating a temp dir"))?;
        let certs = Certs { dir };
        certs.self_signed_ca("ca")?;
        certs.self_signed_ca("other-ca")?;
        certs.signed(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
        )?;
        certs.signed("client", "outbox-tailer", "extendedKeyUsage=clientAuth")?;
        Ok(certs)
    }

    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// A CA that signed nothing here: trusting it alone must fail.
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.crt")
    }

    /// The server's certificate (for `localhost`) and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.path("server.crt"), self.path("server.key"))
    }

    /// The client certificate (CN `outbox-tailer`) and key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.path("client.crt"), self.path("client.key"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn self_signed_ca(&self, name: &str) -> Result<(), HarnessError> {
        openssl(
            self.dir(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=outbox-tailer test {name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ],
        )
    }

    fn signed(&self, name: &str, common_name: &str, extensions: &str) -> Result<(), HarnessError> {
        openssl(
            self.dir(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={common_name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        let ext = format!("{name}.ext");
        std::fs::write(
            self.path(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}\n"
            ),
        )
        .map_err(HarnessError::io("writing an extensions file"))?;
        openssl(
            self.dir(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.crt"),
            ],
        )
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), HarnessError> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|source| HarnessError::NotFound {
            what: "openssl".into(),
            hint: format!("apt-get install -y openssl ({source})"),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Failed {
            what: format!("openssl {}", args.first().unwrap_or(&"")),
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
