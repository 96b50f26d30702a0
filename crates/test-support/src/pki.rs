//! Throw-away RSA keys and self-signed certificates for tests (the worker's unit tests and the
//! integration tests), made per run so that no private key is committed as a fixture.

/// An RSA key and a self-signed certificate for it, both PEM.
pub struct TestCertificate {
    pub key_pem: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
}

impl TestCertificate {
    pub fn generate() -> TestCertificate {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
        let cert = rcgen::CertificateParams::new(vec!["unassign-worker".to_owned()])
            .expect("certificate parameters")
            .self_signed(&key)
            .expect("self-signed certificate");
        TestCertificate {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        }
    }

    /// Key then certificate, as `AZURE_CLIENT_CERTIFICATE_PATH` holds them.
    pub fn pem(&self) -> String {
        format!("{}{}", self.key_pem, self.cert_pem)
    }

    /// The key encrypted with `password` (PBES2: PBKDF2-SHA256, AES-256-CBC) and the certificate.
    pub fn encrypted_pem(&self, password: &str) -> String {
        use pkcs8::der::Decode as _;
        let der = pem::parse(&self.key_pem).expect("key PEM");
        let info = pkcs8::PrivateKeyInfo::from_der(der.contents()).expect("PKCS#8");
        let params =
            pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(2048, b"saltsalt", &[7; 16])
                .expect("PBES2 parameters");
        let encrypted = info
            .encrypt_with_params(params, password)
            .expect("encrypt the key");
        let block = pem::Pem::new("ENCRYPTED PRIVATE KEY", encrypted.as_bytes());
        format!("{}{}", pem::encode(&block), self.cert_pem)
    }
}
