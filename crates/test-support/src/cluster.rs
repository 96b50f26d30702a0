//! A private local RabbitMQ cluster for a test or a benchmark, through
//! `scripts/rabbitmq-cluster.sh`: its own ports and state directory, torn down when dropped (a
//! failing assertion included). Nodes are numbered from 1, as the script numbers them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub struct Cluster {
    base: u16,
    dir: PathBuf,
    nodes: usize,
}

impl Cluster {
    /// Starts `nodes` joined nodes with AMQP on `base`…; `None` picks a base from the process
    /// id, so test binaries running at once do not collide. Several bases are tried when ports
    /// are taken.
    pub fn up(nodes: usize, base: Option<u16>) -> Result<Cluster, String> {
        let bases: Vec<u16> = match base {
            Some(base) => vec![base],
            None => {
                let slot = (std::process::id() % 300) as u16;
                (0..3)
                    .map(|k| 6000 + ((slot + k * 97) % 300) * 10)
                    .collect()
            }
        };
        let mut last = String::new();
        for base in bases {
            let dir =
                std::env::temp_dir().join(format!("unassign-rmq-{}-{base}", std::process::id()));
            let cluster = Cluster { base, dir, nodes };
            match cluster.script(&["up"]) {
                Ok(_) => return Ok(cluster),
                Err(e) => last = e, // dropped: whatever started is torn down
            }
        }
        Err(last)
    }

    /// Runs the script with this cluster's options; its stdout, or its stderr as the error.
    fn script(&self, args: &[&str]) -> Result<String, String> {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq-cluster.sh");
        let output = Command::new(script)
            .arg("--nodes")
            .arg(self.nodes.to_string())
            .arg("--base-port")
            .arg(self.base.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .map_err(|e| format!("running rabbitmq-cluster.sh: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(format!(
                "rabbitmq-cluster.sh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Node `i`'s AMQP URL.
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@{}/%2f", self.label(i))
    }

    /// Every node's URL, comma-separated: `AMQP_URL` for a worker.
    pub fn urls(&self) -> String {
        (1..=self.nodes)
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `127.0.0.1:<port>`, as the worker's `unassign_amqp_node` label shows node `i`.
    pub fn label(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.base as usize + i - 1)
    }

    pub fn stop(&self, i: usize) -> Result<(), String> {
        self.script(&["stop", &i.to_string()]).map(drop)
    }

    pub fn start(&self, i: usize) -> Result<(), String> {
        self.script(&["start", &i.to_string()]).map(drop)
    }

    pub fn kill(&self, i: usize) -> Result<(), String> {
        self.script(&["kill", &i.to_string()]).map(drop)
    }

    /// The node leading quorum queue `queue`.
    pub fn leader(&self, queue: &str) -> Result<usize, String> {
        let out = self.script(&["leader", queue])?;
        out.parse()
            .map_err(|_| format!("leader: unexpected output {out:?}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.script(&["down"]) {
            eprintln!("tearing the test cluster down: {e}");
        }
    }
}
