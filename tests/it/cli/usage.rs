//! The command line itself, without a broker: a bad configuration or command exits 2 naming the
//! key; `--help` shows examples, exit codes, the environment and the dead-letter kinds; shell
//! completions are generated for bash, zsh and fish.

use super::*;

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let (code, _, err) =
        output(command(&[("UNASSIGN__WORKER__CONCURRENCY".into(), "lots".into())]).arg("run"));
    assert_eq!(code, 2, "{err}");
    assert!(err.to_lowercase().contains("worker.concurrency"), "{err}");

    let (code, _, err) = output(command(&[]).arg("run"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("AZURE_TENANT_ID"), "{err}");

    let (code, _, err) = output(command(&[]).args(["run", "--config", "/nonexistent.toml"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent.toml"), "{err}");

    let (code, _, err) = output(command(&[]).arg("frobnicate"));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn help_shows_examples_exit_codes_environment_and_kinds() {
    let (code, out, err) = output(command(&[]).arg("--help"));
    assert_eq!(code, 0, "{err}");
    for needle in [
        "Examples:",
        "Exit codes:",
        "UNASSIGN_CONFIG",
        "UNASSIGN__<SECTION>__<KEY>",
        "AMQP_URL",
        "AZURE_TENANT_ID",
        "completions",
        "probe",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
    let (code, out, _) = output(command(&[]).args(["dlq", "replay", "--help"]));
    assert_eq!(code, 0);
    for kind in unassign_worker::ops::dlq::known_kinds() {
        assert!(
            out.contains(kind),
            "--error-kind does not offer {kind}:\n{out}"
        );
    }
    let (code, _, err) = output(command(&[]).args(["dlq", "replay", "--error-kind", "nope"]));
    assert_eq!(code, 2);
    assert!(err.contains("device_not_found"), "lists the kinds: {err}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = output(command(&[]).args(["completions", shell]));
        assert_eq!(code, 0, "{shell}: {err}");
        for word in [
            "enqueue",
            "dlq",
            "replay",
            "check",
            "probe",
            "config",
            "error-kind",
        ] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, _, _) = output(command(&[]).args(["completions", "tcsh"]));
    assert_eq!(code, 2);
}
