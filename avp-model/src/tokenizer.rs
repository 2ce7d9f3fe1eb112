//! The tokenizer embedded in a GGUF file, built as a `tokenizers::Tokenizer`.
//!
//! GGUF stores byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) as the
//! token strings (in GPT-2's byte-to-unicode form), the merges ("a b") and a type per
//! token; control tokens (type 3, e.g. `<|im_start|>`) become special tokens that
//! are matched whole. The pre-tokenizer follows `tokenizer.ggml.pre`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};

/// GGUF token type of control tokens.
const CONTROL: u64 = 3;
/// GGUF token type of user-defined tokens (matched whole, not special).
const USER_DEFINED: u64 = 4;

/// Qwen2's pre-tokenizer split (as in its tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    g.get(key)?
        .as_array()
        .ok_or_else(|| ModelError::Gguf(format!("{key} is not an array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ModelError::Gguf(format!("{key} holds a non-string")))
        })
        .collect()
}

fn err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Gguf(format!("building the tokenizer: {e}"))
}

/// Build the tokenizer stored in `g`.
pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let model = g.get("tokenizer.ggml.model")?.as_str().unwrap_or_default();
    if model != "gpt2" {
        return Err(ModelError::Gguf(format!(
            "tokenizer.ggml.model {model:?} is not supported (byte-level BPE, \"gpt2\", is)"
        )));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = strings(g, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| ModelError::Gguf(format!("merge {m:?} is not \"a b\"")))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre = g
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM: single digits, then GPT-2's byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        // Qwen2: NFC, its own split regex, then byte-level without the GPT-2 regex.
        "qwen2" => {
            tok.with_normalizer(Some(NFC)).map_err(err)?;
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(err)?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        _ => byte_level.into(),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    if let Some(types) = g
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    {
        let typed = |ty: u64| -> Vec<AddedToken> {
            types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.as_u64() == Some(ty))
                .map(|(_, s)| AddedToken::from(s.to_string(), ty == CONTROL))
                .collect()
        };
        tok.add_special_tokens(typed(CONTROL)).map_err(err)?;
        tok.add_tokens(typed(USER_DEFINED)).map_err(err)?;
    }
    Ok(tok)
}
