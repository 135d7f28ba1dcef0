//! MPT GGUF files (tests/fixtures/make_gguf.py writes them from our fixture checkpoints the way
//! llama.cpp's converter does): the same logits as the HF reference for F32/F16/BF16 files, the
//! same model as in-situ quantization for Q8_0, Q4_0, Q4_K and Q6_K files, the tokenizer rebuilt
//! from the metadata, and a clear error for every kind of bad file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mpt_engine::kv::KvCache;
use mpt_engine::model::gguf::GgufFile;
use mpt_engine::model::mpt::LoadOptions;
use mpt_engine::model::{LogitsWanted, ModelBatch, Mpt, SeqChunk};
use mpt_engine::{EngineError, ModelSource, Quantization, Tokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn gguf(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

fn load(source: ModelSource, quantization: Option<Quantization>) -> Result<Mpt, EngineError> {
    Mpt::load_with(
        &source,
        &Device::Cpu,
        DType::F32,
        LoadOptions { quantization },
        &|_| {},
    )
}

/// Logits at every position of `prompt`, one prefill through a fresh cache.
fn logits(model: &Mpt, prompt: &[u32]) -> Vec<Vec<f32>> {
    let block = 16;
    let blocks = prompt.len().div_ceil(block);
    let mut cache = KvCache::new(model.config(), blocks, block, &Device::Cpu).expect("cache");
    let batch = ModelBatch {
        seqs: vec![SeqChunk {
            tokens: prompt.to_vec(),
            start_pos: 0,
            block_table: (0..blocks as u32).collect(),
            logits: LogitsWanted::All,
        }],
    };
    model
        .forward(&batch, &mut cache)
        .expect("forward")
        .to_vec2::<f32>()
        .expect("logits")
}

fn expected(name: &str) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let path = fixtures()
        .join("models")
        .join(name)
        .join("expected.safetensors");
    let t = candle_core::safetensors::load(path, &Device::Cpu).expect("expected outputs");
    let flat = |t: &Tensor| t.flatten_all().expect("flat");
    let (mut prompts, mut all) = (Vec::new(), Vec::new());
    for i in 0.. {
        let Some(p) = t.get(&format!("prompt.{i}")) else {
            break;
        };
        let ids = flat(&p.to_dtype(DType::I64).expect("ids"))
            .to_vec1::<i64>()
            .expect("ids");
        prompts.push(ids.into_iter().map(|v| v as u32).collect());
        all.push(
            flat(&t[&format!("logits.{i}")])
                .to_vec1::<f32>()
                .expect("logits"),
        );
    }
    (prompts, all)
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    let diff: f32 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).powi(2))
        .sum();
    let norm: f32 = reference.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

#[test]
fn float_gguf_files_give_the_reference_logits() {
    let (prompts, reference) = expected("pow2");
    // f32 is the checkpoint itself; f16 and bf16 round every matrix once.
    for (file, bound) in [
        ("pow2-f32.gguf", 1e-4),
        ("pow2-f16.gguf", 5e-3),
        ("pow2-bf16.gguf", 2e-2),
    ] {
        let model = load(ModelSource::Gguf(gguf(file)), None).expect(file);
        assert_eq!(model.config().d_model, 64);
        for (prompt, want) in prompts.iter().zip(&reference) {
            let err = rel_err(&logits(&model, prompt).concat(), want);
            assert!(err <= bound, "{file}: logits rel err {err} > {bound}");
        }
    }
}

#[test]
fn bf16_weights_run_in_bf16_on_the_cpu_close_to_the_reference() {
    // --dtype bf16: bf16 weights on our bf16 kernel, f32 activations between the layers.
    let (prompts, reference) = expected("pow2");
    let model = Mpt::load_with(
        &ModelSource::Gguf(gguf("pow2-bf16.gguf")),
        &Device::Cpu,
        DType::BF16,
        LoadOptions::default(),
        &|_| {},
    )
    .expect("bf16 model");
    assert_eq!(model.dtype(), DType::BF16);
    for (prompt, want) in prompts.iter().zip(&reference) {
        let err = rel_err(&logits(&model, prompt).concat(), want);
        assert!(err <= 6e-2, "bf16 weights: logits rel err {err}");
    }
}

#[test]
fn q8_0_gguf_files_are_the_in_situ_quantized_checkpoint() {
    // The converter and our loader quantize the same f32 values with ggml's rounding: the two
    // models must hold the same weights, so the logits agree to the last bit.
    for (file, dir) in [
        ("pow2-q8_0.gguf", "pow2"),
        ("heads6-q8_0.gguf", "heads6-sharded"),
    ] {
        let from_file = load(ModelSource::Gguf(gguf(file)), None).expect(file);
        let in_situ = load(
            ModelSource::Dir(fixtures().join("models").join(dir)),
            Some(Quantization::Q8_0),
        )
        .expect(dir);
        assert_eq!(from_file.weight_bytes(), in_situ.weight_bytes(), "{file}");
        let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 1000).collect();
        assert_eq!(
            logits(&from_file, &prompt),
            logits(&in_situ, &prompt),
            "{file}"
        );
    }
}

#[test]
fn k_quant_and_q4_0_gguf_files_hold_what_in_situ_quantization_makes() {
    // quant256-*.gguf carry llama.cpp's bytes (llama-quantize --pure, gguf-py) for every matrix.
    for (file, q) in [
        ("quant256-q4_k.gguf", Quantization::Q4K),
        ("quant256-q6_k.gguf", Quantization::Q6K),
        ("quant256-q4_0.gguf", Quantization::Q4_0),
    ] {
        let from_file = load(ModelSource::Gguf(gguf(file)), None).expect(file);
        let in_situ = load(
            ModelSource::Dir(fixtures().join("models").join("quant256")),
            Some(q),
        )
        .expect("quant256");
        assert_eq!(from_file.weight_bytes(), in_situ.weight_bytes(), "{file}");
        let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 256).collect();
        assert_eq!(
            logits(&from_file, &prompt),
            logits(&in_situ, &prompt),
            "{file}"
        );
    }
}

#[test]
fn quantizing_an_already_quantized_file_is_refused() {
    let err = load(
        ModelSource::Gguf(gguf("pow2-q8_0.gguf")),
        Some(Quantization::Q4K),
    )
    .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("already holds quantized weights"), "{text}");
    // A float file may be quantized while it loads.
    let model = load(
        ModelSource::Gguf(gguf("pow2-f16.gguf")),
        Some(Quantization::Q8_0),
    )
    .expect("f16 file quantized in situ");
    assert!(model.weight_bytes().contains_key("q8_0"));
}

/// A copy of `name` with `edit` applied, in a temp file.
fn edited(name: &str, tag: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(gguf(name)).expect("fixture");
    edit(&mut bytes);
    let path = std::env::temp_dir().join(format!("mpt-gguf-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

fn open_err(path: &Path) -> String {
    GgufFile::open(path)
        .expect_err("bad file refused")
        .to_string()
}

/// A minimal GGUF v3 file: the architecture key and one 2 × 32 tensor of ggml type `type_id`.
fn handmade(arch: &str, type_id: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, arch);
    string(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(type_id.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend([0u8; 256]);
    b
}

#[test]
fn bad_files_get_an_error_naming_the_problem() {
    // Cut inside the tensor data: the first tensor past the end is named.
    let len = std::fs::metadata(gguf("pow2-q8_0.gguf"))
        .expect("fixture")
        .len() as usize;
    let cut = edited("pow2-q8_0.gguf", "cut", |b| b.truncate(len * 3 / 5));
    let text = open_err(&cut);
    assert!(
        text.contains("truncated or corrupt") && text.contains("tensor `"),
        "{text}"
    );
    // Cut inside the header.
    let header = edited("pow2-q8_0.gguf", "header", |b| b.truncate(100));
    let text = open_err(&header);
    assert!(text.contains("not a readable GGUF file"), "{text}");
    // Not a GGUF file at all.
    let junk = edited("pow2-q8_0.gguf", "junk", |b| {
        b[..4].copy_from_slice(b"JUNK")
    });
    assert!(open_err(&junk).contains("not a readable GGUF file"));
    // Another architecture.
    let llama = std::env::temp_dir().join(format!("mpt-gguf-llama-{}.gguf", std::process::id()));
    std::fs::write(&llama, handmade("llama", 0)).expect("write");
    let text = open_err(&llama);
    assert!(
        text.contains("`llama` model") && text.contains("MPT"),
        "{text}"
    );
    // A tensor type no reader knows.
    let odd = std::env::temp_dir().join(format!("mpt-gguf-type-{}.gguf", std::process::id()));
    std::fs::write(&odd, handmade("mpt", 99)).expect("write");
    let text = open_err(&odd);
    assert!(text.contains("ggml type id 99"), "{text}");
    // The handmade MPT file with a known type opens, but lacks the hyper-parameters.
    let bare = std::env::temp_dir().join(format!("mpt-gguf-bare-{}.gguf", std::process::id()));
    std::fs::write(&bare, handmade("mpt", 0)).expect("write");
    let text = load(ModelSource::Gguf(bare.clone()), None)
        .expect_err("no hyper-parameters")
        .to_string();
    assert!(text.contains("mpt.embedding_length"), "{text}");
    for p in [cut, header, junk, llama, odd, bare] {
        let _ = std::fs::remove_file(p);
    }
}

/// Text the GPT-NeoX tokenizer has to get right: merges, byte fallback of emoji and CJK, runs
/// of spaces (its added whitespace tokens), NFC normalization, the special token.
const CORPUS: &[&str] = &[
    "KING.\nMy lord, the Duke of Gloucester hath sent word.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "emoji: 🦀🚀 and 👩‍👩‍👧 family; 中文测试：你好，世界。日本語もテスト。",
    "  leading spaces,\tand    runs   of spaces\n\n\nnewlines           and more        ",
    "def f(x):\n        return x ** 2  # indented code\n",
    "Cafe\u{301} vs Café (NFC), ﬁ ligature, Ⅻ numerals, naïve coöperation",
    "<|endoftext|>special in the middle<|endoftext|>",
    "numbers 1234567890 3.14159 1e-9 0x1F and URLs https://example.com/a?b=c",
];

#[test]
fn tokenizer_rebuilt_from_gguf_metadata_gives_tokenizer_json_ids() {
    let file = GgufFile::open(&gguf("pow2-f32.gguf")).expect("open");
    let rebuilt = file.tokenizer().expect("tokenizer from metadata");
    let reference =
        Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON).expect("tokenizer.json");
    let readme = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/README.md"),
    )
    .expect("demo model card");
    let mut texts: Vec<String> = CORPUS.iter().map(|s| s.to_string()).collect();
    texts.extend(readme.lines().map(str::to_string));
    let mut tokens = 0;
    for text in &texts {
        let want = reference.encode(text).expect("encode");
        assert_eq!(
            rebuilt.encode(text).expect("encode"),
            want,
            "ids of {text:?}"
        );
        assert_eq!(
            rebuilt.decode(&want).expect("decode"),
            reference.decode(&want).expect("decode")
        );
        tokens += want.len();
    }
    assert!(tokens > 500, "corpus too small: {tokens} tokens");
    assert_eq!(rebuilt.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(rebuilt.vocab_size(), reference.vocab_size());
    // A file without tokenizer metadata says what is missing.
    let bare = GgufFile::open(&gguf("pow2-q8_0.gguf")).expect("open");
    let text = bare.tokenizer().expect_err("no tokenizer").to_string();
    assert!(text.contains("tokenizer.ggml.model"), "{text}");
}
