//! Hostile and clumsy use: peft-rs never destroys a user's files, survives
//! signals and full disks, and bounds the time and memory any input can
//! cost. Each test is one case of the reliability issue, numbered as there.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    assert_ok, assert_user_error, copy_dir, edit_json, peft_rs, run_within, s, steps_logged, tiny,
    wait_for, Cmd,
};

/// A copy of the tiny model in `dir`.
fn copy_model(dir: &Path) -> PathBuf {
    copy_dir(&tiny(), dir)
}

/// A small trained adapter for the tiny model (made once per test binary).
fn adapter() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = common::repo().join(format!(
            "target/test-tmp/reliability-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let data = common::alpaca(&root, 16);
        let out = root.join("adapter");
        Cmd::new("train")
            .path("--model", &tiny())
            .path("--data", &data)
            .path("--output", &out)
            .args("--device cpu --max-steps 1 --lora-rank 2 --max-seq-len 96")
            .run_ok();
        out
    })
}

/// A copy of the adapter in `dir`.
fn copy_adapter(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter().join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

/// `train` on the tiny model with `data`, written to `out`.
fn train_cmd(data: &Path, out: &Path) -> Cmd {
    Cmd::new("train --device cpu --batch-size 2 --max-seq-len 64 --lora-rank 2 --seed 3")
        .path("--data", data)
        .path("--output", out)
        .path("--model", &tiny())
}

/// `generate --device cpu --prompt hi` on `model`.
fn generate(model: &Path) -> Cmd {
    Cmd::generate(model, "--device cpu --prompt hi")
}

fn send(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(snapshot(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

#[test]
fn case_01_merge_never_overwrites_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model(&tmp.path().join("model"));
    let adapter = copy_adapter(&tmp.path().join("adapter"));
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let before = snapshot(tmp.path());
    let merge = |out: &Path| Cmd::merge(&model, &adapter, out).arg("--overwrite").run();
    assert_user_error(&merge(tmp.path()), &["contains the base model"]);
    assert_user_error(&merge(&adapter), &["is the adapter"]);
    assert_user_error(
        &merge(&model.join("merged")),
        &["lies inside the base model"],
    );
    assert_eq!(snapshot(tmp.path()), before, "nothing was changed");
    // --overwrite replaces an earlier merge, and only that.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "x").unwrap();
    assert_user_error(&merge(&other), &["not written by peft-rs merge"]);
    assert!(other.join("keep.txt").exists());
    let out = tmp.path().join("merged");
    for _ in 0..2 {
        assert_ok(&merge(&out));
    }
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn case_02_merge_follows_a_model_dir_of_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    // The Hugging Face cache: snapshots/<rev>/ holds symlinks into blobs/.
    let blobs = copy_model(&tmp.path().join("blobs"));
    let snap = tmp.path().join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    let out = tmp.path().join("merged");
    Cmd::merge(&snap, adapter(), &out).run_ok();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the merged model");
    }
    generate(&out).args("--max-new-tokens 2").run_ok();
}

#[test]
fn case_03_train_refuses_a_folder_of_someone_elses_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 8);
    let out = tmp.path().join("mine");
    std::fs::create_dir_all(&out).unwrap();
    for (f, text) in [
        ("adapter_config.json", "{\"mine\": 1}"),
        ("metrics.jsonl", "mine\n"),
        ("training_args.json", "{}"),
    ] {
        std::fs::write(out.join(f), text).unwrap();
    }
    let before = snapshot(&out);
    assert_user_error(
        &train_cmd(&data, &out).args("--max-steps 1").run(),
        &["holds files peft-rs did not write", "adapter_config.json"],
    );
    assert_eq!(snapshot(&out), before, "the user's files are untouched");
}

#[test]
fn case_04_a_second_writer_of_one_output_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 64);
    let out = tmp.path().join("run");
    let mut first = train_cmd(&data, &out)
        .args("--max-steps 200 --save-steps 5")
        .spawn(&[]);
    wait_for(
        "the first run's first step",
        Duration::from_secs(120),
        || steps_logged(&out) > 0,
    );
    let t0 = Instant::now();
    let second = train_cmd(&data, &out)
        .args("--max-steps 200 --seed 9 --resume")
        .run();
    assert_user_error(
        &second,
        &["another peft-rs process", &format!("pid {}", first.id())],
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "it must fail fast");
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn case_05_first_signal_checkpoints_and_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 48);
    let full = tmp.path().join("full");
    let cut = tmp.path().join("cut");
    let steps = "--max-steps 12 --lora-dropout 0.1 --neftune-alpha 5";
    train_cmd(&data, &full).args(steps).run_ok();

    // No --save-steps: without the handler everything would be lost.
    let cmd = train_cmd(&data, &cut).args(steps);
    let child = cmd.spawn(&[]);
    wait_for("step 3", Duration::from_secs(120), || {
        steps_logged(&cut) >= 3
    });
    send(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("--resume") && stderr.contains("checkpoint-"),
        "{stderr}"
    );
    let saved: Vec<_> = std::fs::read_dir(&cut)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(saved.len(), 1);
    assert!(saved[0].path().join("COMPLETE").exists());
    cmd.arg("--resume").run_ok();
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(cut.join("adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "interrupted + resumed must equal uninterrupted, bit for bit"
    );

    // A second signal ends the process at once.
    let again = tmp.path().join("again");
    let child = train_cmd(&data, &again).args("--max-steps 400").spawn(&[]);
    wait_for("step 1", Duration::from_secs(120), || {
        steps_logged(&again) >= 1
    });
    send(&child, libc::SIGTERM);
    send(&child, libc::SIGTERM);
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn case_06_inputs_cannot_cost_unbounded_time_or_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A chat of more turns than any conversation has.
    let turns: Vec<serde_json::Value> = (0..5000)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": "hello there"}))
        .collect();
    let chat = tmp.path().join("chat.jsonl");
    std::fs::write(
        &chat,
        format!("{}\n", serde_json::json!({"messages": turns})),
    )
    .unwrap();
    let cmd = train_cmd(&chat, &out).args("--max-steps 1");
    assert_user_error(
        &cmd.run_within(Duration::from_secs(60)),
        &["chat.jsonl:1", "5000 turns"],
    );
    // 1000 turns (365 KB) is allowed, and fast: what cannot fit in
    // --max-seq-len is not rendered.
    let turns: Vec<serde_json::Value> = (0..1000)
        .map(|i| serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": "word ".repeat(70)}))
        .collect();
    std::fs::write(
        &chat,
        format!("{}\n", serde_json::json!({"messages": turns})),
    )
    .unwrap();
    let r = cmd
        .args("--max-seq-len 1024")
        .run_within(Duration::from_secs(60));
    assert_ok(&r);

    // A chat template that never ends.
    let model = copy_model(&tmp.path().join("model"));
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    )
    .unwrap();
    let g = Cmd::generate(&model, "--device cpu --chat hi").run_within(Duration::from_secs(120));
    assert_user_error(&g, &["chat template", "steps"]);

    // num_hidden_layers 1e9 is refused before anything is allocated.
    let model = copy_model(&tmp.path().join("model2"));
    let layers = |n: u64| {
        edit_json(&model.join("config.json"), |c| {
            c["num_hidden_layers"] = serde_json::json!(n)
        });
        generate(&model).run_within(Duration::from_secs(30))
    };
    let g = layers(1_000_000_000);
    assert_user_error(&g, &["num_hidden_layers"]);
    let g = layers(3);
    assert_user_error(&g, &["num_hidden_layers", "hold 2 layers"]);

    // One 10 MB JSONL line costs what the kept tokens cost.
    let big = tmp.path().join("big.jsonl");
    let huge = "lorem ipsum dolor sit amet ".repeat(10 << 20 >> 5);
    std::fs::write(
        &big,
        format!(
            "{}\n",
            serde_json::json!({"prompt": "Say:", "completion": huge})
        ),
    )
    .unwrap();
    let out2 = tmp.path().join("out2");
    let cmd = train_cmd(&big, &out2).args("--max-steps 1");
    let t0 = Instant::now();
    let r = Command::new("/usr/bin/time")
        .args(["-f", "%M", env!("CARGO_BIN_EXE_peft-rs")])
        .args(&cmd.0)
        .output()
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    let kib: u64 = stderr.lines().last().unwrap().trim().parse().unwrap();
    eprintln!("a 10 MB record: {secs:.1} s, peak RSS {} MiB", kib / 1024);
    assert!(kib < 1_200_000, "peak RSS {kib} KiB for a 10 MB record");

    // Devices and FIFOs are not files to read.
    let model = copy_model(&tmp.path().join("model3"));
    std::fs::remove_file(model.join("config.json")).unwrap();
    symlink("/dev/zero", model.join("config.json")).unwrap();
    let g = generate(&model).run_within(Duration::from_secs(20));
    assert_user_error(&g, &["config.json", "not a regular file"]);
    let model = copy_model(&tmp.path().join("model4"));
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let c = std::ffi::CString::new(s(&model.join("model.safetensors"))).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let g = generate(&model).run_within(Duration::from_secs(20));
    assert_user_error(&g, &["model.safetensors", "not a regular file"]);
    let bad_adapter = copy_adapter(&tmp.path().join("adapter"));
    std::fs::remove_file(bad_adapter.join("adapter_model.safetensors")).unwrap();
    symlink("/dev/zero", bad_adapter.join("adapter_model.safetensors")).unwrap();
    let g = Cmd::generate(&tiny(), "")
        .path("--adapter", &bad_adapter)
        .args("--device cpu --prompt hi")
        .run_within(Duration::from_secs(20));
    assert_user_error(&g, &["adapter_model.safetensors", "not a regular file"]);
    assert_user_error(
        &train_cmd(Path::new("/dev/zero"), &out)
            .args("--max-steps 1")
            .run_within(Duration::from_secs(20)),
        &["/dev/zero", "not a regular file"],
    );
}

#[test]
fn case_07_huge_requests_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 8);
    let out = tmp.path().join("o");
    assert_user_error(
        &train_cmd(&data, &out).args("--lora-rank 1000000000").run(),
        &["--lora-rank 1000000000"],
    );
    assert_user_error(
        &train_cmd(&data, &out).args("--epochs inf").run(),
        &["--epochs"],
    );
    assert_user_error(
        &Cmd::new("eval")
            .path("--model", &tiny())
            .args("--device cpu")
            .path("--data", &data)
            .args("--batch-size 0")
            .run(),
        &["--batch-size"],
    );
    assert_user_error(
        &Cmd::generate(
            &tiny(),
            "--device cpu --prompt x --max-new-tokens 1000000000000",
        )
        .run(),
        &["--max-new-tokens"],
    );
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1, \"loss\": 2.0}\n").unwrap();
    let png = tmp.path().join("x.png");
    assert_user_error(
        &Cmd::new("plot")
            .arg(s(&run))
            .path("--output", &png)
            .args("--width 100000 --height 100000")
            .run(),
        &["--width 100000"],
    );
    // A libtorch failure inside the process (an allocation that cannot be
    // made) becomes one line, as the binary reports it.
    let payload = std::panic::catch_unwind(|| {
        tch::Tensor::zeros([1i64 << 50], (tch::Kind::Float, tch::Device::Cpu))
    })
    .expect_err("allocating 4 PB must fail");
    let text = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    let line = peft_rs::cli::describe_panic(&text);
    assert!(line.starts_with("libtorch: "), "{line}");
    assert!(!line.contains('\n') && line.contains("allocate"), "{line}");
}

#[test]
fn case_08_broken_adapters_and_configs_are_refused_not_silently_used() {
    let tmp = tempfile::tempdir().unwrap();
    let m = s(&tiny()).to_owned();
    let gen = |extra: &[&str]| {
        Cmd::new("generate --device cpu --prompt hi --max-new-tokens 2")
            .all(extra)
            .run()
    };
    // NaN weights.
    let nan = copy_adapter(&tmp.path().join("nan"));
    let w = nan.join("adapter_model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&w).unwrap();
    let _ = tensors[0].1.fill_(f64::NAN);
    tch::Tensor::write_safetensors(&tensors, &w).unwrap();
    assert_user_error(
        &gen(&["--model", &m, "--adapter", s(&nan)]),
        &["adapter_model.safetensors", "NaN"],
    );
    // lora_alpha 1e38.
    let big = copy_adapter(&tmp.path().join("alpha"));
    edit_json(&big.join("adapter_config.json"), |c| {
        c["lora_alpha"] = serde_json::json!(1e38)
    });
    assert_user_error(
        &gen(&["--model", &m, "--adapter", s(&big)]),
        &["lora_alpha", "overflow"],
    );
    // --weights nan,1.
    let a = s(adapter()).to_owned();
    assert_user_error(
        &gen(&[
            "--model",
            &m,
            "--adapter",
            &a,
            "--adapter",
            &a,
            "--weights",
            "nan,1",
        ]),
        &["--weights NaN"],
    );
    // rms_norm_eps -1.
    let model = copy_model(&tmp.path().join("model"));
    edit_json(&model.join("config.json"), |c| {
        c["rms_norm_eps"] = serde_json::json!(-1.0)
    });
    assert_user_error(&gen(&["--model", s(&model)]), &["rms_norm_eps"]);
}

#[test]
fn case_09_no_leftovers_and_whole_units() {
    let tmp = tempfile::tempdir().unwrap();
    let m = s(&tiny()).to_owned();
    // A killed merge's temporary folder is removed by the next merge.
    let stale = tmp.path().join(".merged.tmp-999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    let out = tmp.path().join("merged");
    Cmd::merge(&tiny(), adapter(), &out).run_ok();
    assert!(!stale.exists(), "the stale temporary folder is gone");
    let leftovers = common::entries(tmp.path(), |n| n.starts_with('.'));
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // A write that fails removes its temporary file.
    let target = tmp.path().join("occupied");
    std::fs::create_dir_all(target.join("inside")).unwrap();
    assert!(peft_rs::adapters::fsio::write_atomic(&target, b"data").is_err());
    let tmp_files = common::entries(tmp.path(), |n| n.contains(".tmp-"));
    assert!(tmp_files.is_empty(), "left behind: {tmp_files:?}");

    // Past `ulimit -f`, a write fails with the file named, no silent death.
    let limited = tmp.path().join("limited");
    let sh = format!(
        "ulimit -f 512; exec {} merge --model {m} --adapter {} --output {}",
        env!("CARGO_BIN_EXE_peft-rs"),
        s(adapter()),
        s(&limited)
    );
    let r = Command::new("bash").args(["-c", &sh]).output().unwrap();
    assert_user_error(&r, &["model.safetensors", "cannot write"]);
    assert!(!limited.exists());

    // The adapter's config is written when training starts, so the weights,
    // written last in one rename, never appear without it.
    let data = common::alpaca(tmp.path(), 32);
    let run = tmp.path().join("run");
    let mut child = train_cmd(&data, &run).args("--max-steps 300").spawn(&[]);
    wait_for("step 1", Duration::from_secs(120), || {
        steps_logged(&run) >= 1
    });
    assert!(run.join("adapter_config.json").exists());
    assert!(!run.join("adapter_model.safetensors").exists());
    child.kill().unwrap();
    child.wait().unwrap();

    // Replacing an output is an exchange: the old one is there until the new one is.
    let a = tmp.path().join("pub-new");
    let b = tmp.path().join("pub-old");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(a.join("f"), "new").unwrap();
    std::fs::write(b.join("f"), "old").unwrap();
    peft_rs::outputs::publish_dir(&a, &b).unwrap();
    assert_eq!(std::fs::read_to_string(b.join("f")).unwrap(), "new");
    assert!(!a.exists());
}

#[test]
fn case_10_shard_paths_stay_in_the_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    for bad in [
        "../x.safetensors",
        "/etc/x.safetensors",
        "sub/model.safetensors",
    ] {
        let model = copy_model(&tmp.path().join(format!("m{}", bad.len())));
        let header_names: Vec<String> = {
            let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let h: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            h.keys().filter(|k| *k != "__metadata__").cloned().collect()
        };
        let map: serde_json::Map<String, serde_json::Value> = header_names
            .iter()
            .map(|k| (k.clone(), serde_json::json!(bad)))
            .collect();
        std::fs::write(
            model.join("model.safetensors.index.json"),
            serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
        )
        .unwrap();
        let g = generate(&model).run();
        assert_user_error(
            &g,
            &["model.safetensors.index.json", bad, "not a plain file name"],
        );
    }
}

#[test]
fn case_11_disk_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = s(&tiny()).to_owned();
    let bin = env!("CARGO_BIN_EXE_peft-rs");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    // Merges into {mnt}/merged after `mount` (in a private mount namespace).
    let merge_after = |mount: String| {
        let sh = format!(
            "{mount} && exec {bin} merge --model {m} --adapter {a} --output {mnt}/merged",
            mnt = s(&mnt),
            a = s(adapter())
        );
        Command::new("unshare")
            .args(["-rm", "sh", "-c", &sh])
            .output()
            .unwrap()
    };
    // A 256 KiB file system: the merged model does not fit.
    let r = merge_after(format!("mount -t tmpfs -o size=256k tmpfs {}", s(&mnt)));
    assert_user_error(&r, &["model.safetensors", "No space left on device"]);
    // A read-only file system.
    let r = merge_after(format!(
        "mount -t tmpfs -o size=1m tmpfs {mnt} && mount -o remount,ro {mnt}",
        mnt = s(&mnt)
    ));
    assert_user_error(&r, &["merged", "Read-only file system"]);
    // A damaged trainer state.
    let data = common::alpaca(tmp.path(), 16);
    let run = tmp.path().join("run");
    let cmd = train_cmd(&data, &run).args("--max-steps 4 --save-steps 2");
    cmd.run_ok();
    let state = run.join("checkpoint-2/trainer_state.json");
    // Damaged in place, at its size, so that the manifest still lists it.
    let len = std::fs::metadata(&state).unwrap().len() as usize;
    std::fs::write(&state, format!("{{{}", "x".repeat(len - 1))).unwrap();
    assert_user_error(
        &cmd.arg("--resume").run(),
        &["checkpoint-2/trainer_state.json"],
    );
    // A plot that cannot be written.
    let png = tmp.path().join("no/such/dir/loss.png");
    assert_user_error(
        &peft_rs(&["plot", s(&run), "--output", s(&png)]),
        &["loss.png", "cannot write"],
    );
}

#[test]
fn case_12_plot_draws_absurd_losses_without_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let lines: Vec<String> = (1..=20)
        .map(|s| {
            let loss = match s {
                7 => 1e308,
                8 => -1e308,
                _ => 2.0 - s as f64 * 0.01,
            };
            serde_json::json!({"step": s, "loss": loss}).to_string()
        })
        .collect();
    std::fs::write(run.join("metrics.jsonl"), lines.join("\n")).unwrap();
    let png = tmp.path().join("loss.png");
    let r = run_within(
        Duration::from_secs(30),
        &["plot", s(&run), "--output", s(&png)],
    );
    assert_ok(&r);
    assert!(String::from_utf8_lossy(&r.stderr).contains("2 loss value(s)"));
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // A file that is not a picture is not replaced.
    let notes = tmp.path().join("notes.png");
    std::fs::write(&notes, "my notes").unwrap();
    assert_user_error(
        &peft_rs(&["plot", s(&run), "--output", s(&notes)]),
        &["not a PNG"],
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
}
