//! Unit tests of the configuration: parsing, precedence, validation.

use super::*;

#[test]
fn sizes_parse_with_binary_and_decimal_units() {
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("lots").is_err());
    assert!(parse_size("2XB").is_err());
    assert!(parse_size("0").is_err());
}

#[test]
fn command_line_overrides_file_which_overrides_defaults() {
    let file =
        parse_file("port = 9000\nmax_num_seqs = 8\nkv_cache_memory = \"64MiB\"\n").expect("valid");
    let cli = Cli::try_parse_from(["mpt-server", "--port", "9100"]).expect("valid");
    let c = ServerConfig::resolve(cli, file).expect("valid");
    assert_eq!(c.port, 9100);
    assert_eq!(c.max_num_seqs, 8);
    assert_eq!(c.kv_cache, KvCacheSize::Bytes(64 << 20));
    assert_eq!(c.served_model_name, DEMO_MODEL_NAME);
    assert_eq!(c.engine_config().model, ModelSource::Demo);
}

#[test]
fn unknown_toml_key_is_named() {
    let err = parse_file("prot = 1\n").expect_err("unknown key");
    assert!(err.contains("prot"), "{err}");
}

#[test]
fn api_key_is_redacted() {
    let cli = Cli::try_parse_from(["mpt-server", "--api-key", "sekrit-123"]).expect("valid");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert!(!c.redacted().contains("sekrit"));
    assert_eq!(c.api_key.as_deref(), Some("sekrit-123"));
}

#[test]
fn blocks_and_memory_conflict() {
    let file = parse_file("num_kv_blocks = 10\nkv_cache_memory = 100000\n").expect("valid");
    assert!(ServerConfig::resolve(Cli::default(), file).is_err());
    assert!(
        Cli::try_parse_from(["x", "--num-kv-blocks", "4", "--kv-cache-memory", "1MiB"]).is_err()
    );
}

#[test]
fn model_dir_names_the_model() {
    let cli = Cli::try_parse_from([
        "x",
        "--model",
        "/models/mpt-7b-instruct",
        "--device",
        "cuda:1",
    ])
    .expect("valid");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert_eq!(c.served_model_name, "mpt-7b-instruct");
    assert_eq!(c.device, DeviceSpec::Cuda(1));
}

#[test]
fn gpu_flags_reach_the_engine_config() {
    let cli = Cli::try_parse_from([
        "x",
        "--load-format",
        "dummy",
        "--attention-kernels",
        "custom",
        "--gpu-memory-utilization",
        "0.5",
    ])
    .expect("valid");
    let engine = ServerConfig::resolve(cli, FileConfig::default())
        .expect("valid")
        .engine_config();
    assert_eq!(engine.load_format, LoadFormat::Dummy);
    assert_eq!(engine.attention_kernels, AttentionKernels::Custom);
    assert_eq!(engine.gpu_memory_utilization, 0.5);
    // The file sets them too; the command line wins.
    let file = parse_file(
        "load_format = \"dummy\"\nattention_kernels = \"candle-ops\"\ngpu_memory_utilization = 0.8\n",
    )
    .expect("valid");
    let cli = Cli::try_parse_from(["x", "--load-format", "auto"]).expect("valid");
    let c = ServerConfig::resolve(cli, file).expect("valid");
    assert_eq!(c.load_format, LoadFormat::Auto);
    assert_eq!(c.attention_kernels, AttentionKernels::CandleOps);
    assert_eq!(c.gpu_memory_utilization, 0.8);
}

#[test]
fn defaults_leave_the_kv_cache_to_the_device() {
    let c = ServerConfig::default();
    assert_eq!(c.kv_cache, KvCacheSize::Auto);
    assert_eq!(c.gpu_memory_utilization, 0.9);
    assert_eq!(c.load_format, LoadFormat::Auto);
    assert_eq!(c.attention_kernels, AttentionKernels::CandleOps);
    // An explicit size is kept as given (it wins over the GPU fraction in the engine).
    let cli = Cli::try_parse_from(["x", "--kv-cache-memory", "2GiB"]).expect("valid");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert_eq!(c.engine_config().kv_cache, KvCacheSize::Bytes(2 << 30));
}

#[test]
fn bad_gpu_settings_name_the_flag() {
    for (args, flag) in [
        (
            vec!["x", "--gpu-memory-utilization", "0"],
            "--gpu-memory-utilization",
        ),
        (
            vec!["x", "--gpu-memory-utilization", "1.5"],
            "--gpu-memory-utilization",
        ),
        (vec!["x", "--load-format", "pt"], "--load-format"),
        (
            vec!["x", "--attention-kernels", "flash"],
            "--attention-kernels",
        ),
    ] {
        let cli = Cli::try_parse_from(args.clone()).expect("parses");
        let err = ServerConfig::resolve(cli, FileConfig::default()).expect_err("invalid");
        assert!(err.to_string().contains(flag), "{args:?}: {err}");
    }
    assert!(Cli::try_parse_from(["x", "--gpu-memory-utilization", "most"]).is_err());
    let file = parse_file("gpu_memory_utilization = 2\n").expect("a number");
    assert!(ServerConfig::resolve(Cli::default(), file).is_err());
}

#[test]
fn help_names_every_env_var_without_a_value() {
    use clap::CommandFactory;
    let help = Cli::command().render_help().to_string();
    assert!(help.contains("[env: MPT_SERVER_NUM_KV_BLOCKS]"), "{help}");
    assert!(
        !help.contains("=]"),
        "an env var shown with an empty value:\n{help}"
    );
}

#[test]
fn quantization_parses_and_an_unknown_name_lists_the_valid_ones() {
    let cli = Cli::try_parse_from(["x", "--quantization", "Q8_0"]).expect("valid");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert_eq!(c.quantization, Some(Quantization::Q8_0));
    assert_eq!(c.engine_config().quantization, Some(Quantization::Q8_0));
    let file = parse_file("quantization = \"q4_k\"\n").expect("valid");
    let c = ServerConfig::resolve(Cli::default(), file).expect("valid");
    assert_eq!(c.quantization, Some(Quantization::Q4K));
    assert_eq!(ServerConfig::default().quantization, None);
    let cli = Cli::try_parse_from(["x", "--quantization", "int8"]).expect("parses as text");
    let err = ServerConfig::resolve(cli, FileConfig::default())
        .expect_err("unknown format")
        .to_string();
    assert!(
        err.contains("--quantization") && err.contains("q8_0, q4_k, q6_k, q4_0"),
        "{err}"
    );
}

#[test]
fn allow_unknown_fields_from_the_flag_or_the_file() {
    assert!(!ServerConfig::default().allow_unknown_fields);
    let cli = Cli::try_parse_from(["x", "--allow-unknown-fields"]).expect("bare flag");
    assert!(
        ServerConfig::resolve(cli, FileConfig::default())
            .expect("valid")
            .allow_unknown_fields
    );
    let file = parse_file("allow_unknown_fields = true\n").expect("valid");
    assert!(Cli::try_parse_from(["x", "--allow-unknown-fields", "false"]).is_err());
    assert!(
        ServerConfig::resolve(Cli::default(), file)
            .expect("valid")
            .allow_unknown_fields
    );
}

#[test]
fn batch_invariance_is_on_unless_the_flag_or_the_file_turns_it_off() {
    assert!(ServerConfig::default().engine_config().batch_invariant);
    let resolve = |args: &[&str], toml: &str| {
        let cli = Cli::try_parse_from(args).expect("valid flags");
        let file = parse_file(toml).expect("valid file");
        ServerConfig::resolve(cli, file)
            .expect("valid")
            .engine_config()
            .batch_invariant
    };
    assert!(!resolve(&["x", "--batch-invariant", "false"], ""));
    assert!(!resolve(&["x"], "batch_invariant = false\n"));
    assert!(resolve(
        &["x", "--batch-invariant", "true"],
        "batch_invariant = false\n"
    ));
    assert!(Cli::try_parse_from(["x", "--batch-invariant", "maybe"]).is_err());
}

#[test]
fn a_gguf_file_is_served_by_its_stem_with_an_optional_tokenizer() {
    let cli = Cli::try_parse_from([
        "x",
        "--model",
        "/models/mpt-7b.Q8_0.gguf",
        "--tokenizer",
        "/models/tok.json",
    ])
    .expect("valid");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert_eq!(c.served_model_name, "mpt-7b.Q8_0");
    let e = c.engine_config();
    assert_eq!(
        e.model,
        ModelSource::Gguf(PathBuf::from("/models/mpt-7b.Q8_0.gguf"))
    );
    assert_eq!(e.tokenizer, Some(PathBuf::from("/models/tok.json")));
}

#[test]
fn kv_cache_dtype_comes_from_flag_env_name_or_file_and_bad_names_list_the_valid_ones() {
    let c = ServerConfig::default();
    assert_eq!(c.engine_config().kv_cache_dtype, KvCacheDtype::Auto);
    let cli = Cli::try_parse_from(["x", "--kv-cache-dtype", "BF16"]).expect("parses");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert_eq!(c.engine_config().kv_cache_dtype, KvCacheDtype::Bf16);
    let file = parse_file("kv_cache_dtype = \"f32\"\n").expect("valid");
    let c = ServerConfig::resolve(Cli::default(), file).expect("valid");
    assert_eq!(c.kv_cache_dtype, KvCacheDtype::F32);
    let cli = Cli::try_parse_from(["x", "--kv-cache-dtype", "fp8"]).expect("parses");
    let err = ServerConfig::resolve(cli, FileConfig::default()).expect_err("unknown");
    let text = err.to_string();
    assert!(
        text.contains("--kv-cache-dtype") && text.contains("\"fp8\""),
        "{text}"
    );
    assert!(text.contains("auto, f32, f16, bf16"), "{text}");
}

#[test]
fn speculative_config_comes_from_the_flag_or_a_file_table_and_is_refused_by_name() {
    let off = ServerConfig::resolve(Cli::default(), FileConfig::default()).expect("valid");
    assert_eq!(off.engine_config().speculative, None);
    let want = Some(NgramSpeculation {
        num_speculative_tokens: 4,
        prompt_lookup_max: 3,
        prompt_lookup_min: 1,
        disable_by_batch_size: None,
    });
    let json = r#"{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":3,"prompt_lookup_min":1}"#;
    let cli = Cli::try_parse_from(["mpt-server", "--speculative-config", json]).expect("valid");
    let c = ServerConfig::resolve(cli, FileConfig::default()).expect("valid");
    assert_eq!(c.engine_config().speculative, want);
    let file = parse_file(
        "[speculative_config]\nmethod = \"ngram\"\nnum_speculative_tokens = 4\n\
         prompt_lookup_max = 3\nprompt_lookup_min = 1\n",
    )
    .expect("valid");
    let from_file = ServerConfig::resolve(Cli::default(), file.clone()).expect("valid");
    assert_eq!(from_file.speculative, want);
    // An empty flag (a templated env var left blank) turns a file's setting off.
    let cli = Cli::try_parse_from(["mpt-server", "--speculative-config", ""]).expect("valid");
    assert_eq!(
        ServerConfig::resolve(cli, file).expect("valid").speculative,
        None
    );
    let err = parse_file("[speculative_config]\nmethod = \"ngram\"\nlookahead = 2\n")
        .expect_err("unknown key");
    assert!(err.contains("lookahead"), "{err}");
    for (json, needle) in [
        (
            r#"{"method":"eagle","num_speculative_tokens":2}"#,
            "supported: ngram",
        ),
        (
            r#"{"method":"ngram","num_speculative_tokens":99}"#,
            "between 1 and 32",
        ),
        ("{", "expected e.g."),
    ] {
        let cli =
            Cli::try_parse_from(["mpt-server", "--speculative-config", json]).expect("parses");
        let err = ServerConfig::resolve(cli, FileConfig::default()).expect_err(json);
        let text = err.to_string();
        assert!(
            text.contains("--speculative-config") && text.contains(needle),
            "{text}"
        );
    }
}
