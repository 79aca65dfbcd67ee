//! BOS/EOS of a model directory: which ids, and whether the tokenizer adds them.
//!
//! Ids, first found wins: the `bos_token` / `eos_token` strings of `tokenizer_config.json`
//! looked up in `tokenizer.json`; `generation_config.json`; `config.json`. Whether they are
//! added: `add_bos_token` / `add_eos_token` of `tokenizer_config.json` when present (transformers
//! rebuilds the post-processor from them), else what `tokenizer.json`'s post-processor does to
//! a probe text (Llama 3 adds `<|begin_of_text|>` that way).

use std::path::Path;

use serde_json::Value;

use super::{read_json, HfError};

/// The special tokens of a model directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HfSpecials {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The tokenizer puts BOS before every text.
    pub add_bos: bool,
    /// The tokenizer puts EOS after every text.
    pub add_eos: bool,
}

impl HfSpecials {
    /// BOS to prepend to each document: the id when the tokenizer adds it.
    pub fn bos_to_add(&self) -> Option<u32> {
        self.bos_token_id.filter(|_| self.add_bos)
    }

    /// EOS to append to each document: the id when the tokenizer adds it.
    pub fn eos_to_add(&self) -> Option<u32> {
        self.eos_token_id.filter(|_| self.add_eos)
    }
}

/// The content of a `bos_token`-like entry: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// An id, or the first of a list of ids.
fn first_id(v: Option<&Value>) -> Option<u32> {
    let v = v?;
    let x = match v {
        Value::Array(a) => a.first()?,
        x => x,
    };
    x.as_u64().and_then(|x| u32::try_from(x).ok())
}

/// Read the special tokens of `dir` (every file optional).
pub fn read_specials(dir: &Path) -> Result<HfSpecials, HfError> {
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let gen_config = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        Some(
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| HfError::Json {
                path: tok_path.clone(),
                message: format!("not a tokenizer: {e}"),
            })?,
        )
    } else {
        None
    };
    let id = |text_key: &str, id_key: &str| -> Option<u32> {
        token_text(tok_config.get(text_key))
            .and_then(|t| tokenizer.as_ref()?.token_to_id(t))
            .or_else(|| first_id(gen_config.get(id_key)))
            .or_else(|| first_id(config.get(id_key)))
    };
    let bos_token_id = id("bos_token", "bos_token_id");
    let eos_token_id = id("eos_token", "eos_token_id");

    // What the post-processor adds around a probe text.
    let (mut probed_bos, mut probed_eos) = (false, false);
    if let Some(tok) = &tokenizer {
        let ids = |special: bool| {
            tok.encode("a", special)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        };
        let (with, without) = (ids(true), ids(false));
        if with.len() > without.len() {
            probed_bos = bos_token_id.is_some() && with.first().copied() == bos_token_id;
            probed_eos = eos_token_id.is_some() && with.last().copied() == eos_token_id;
        }
    }
    let flag = |key: &str| tok_config.get(key).and_then(Value::as_bool);
    Ok(HfSpecials {
        bos_token_id,
        eos_token_id,
        add_bos: flag("add_bos_token").unwrap_or(probed_bos) && bos_token_id.is_some(),
        add_eos: flag("add_eos_token").unwrap_or(probed_eos) && eos_token_id.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A word-level tokenizer with `<s>`=1, `</s>`=2 and a post-processor adding `<s>`.
    fn write_tokenizer(dir: &Path, post_bos: bool) {
        let post = if post_bos {
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}})
        } else {
            Value::Null
        };
        let t = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": post,
            "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "<s>": 1, "</s>": 2, "a": 3}}
        });
        std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    }

    #[test]
    fn tokenizer_config_names_tokens_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), false);
        let tc = json!({"add_bos_token": true, "add_eos_token": false,
                        "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
        let s = read_specials(dir.path()).unwrap();
        assert_eq!(
            s,
            HfSpecials {
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                add_bos: true,
                add_eos: false
            }
        );
        assert_eq!((s.bos_to_add(), s.eos_to_add()), (Some(1), None));
    }

    #[test]
    fn post_processor_decides_when_the_flag_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), true);
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"bos_token_id": 1, "eos_token_id": [2, 9]}"#,
        )
        .unwrap();
        let s = read_specials(dir.path()).unwrap();
        assert_eq!(
            s,
            HfSpecials {
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                add_bos: true,
                add_eos: false
            }
        );
    }

    #[test]
    fn no_files_means_no_specials() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_specials(dir.path()).unwrap(), HfSpecials::default());
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"bos_token_id": 5, "eos_token_id": 6}"#,
        )
        .unwrap();
        let s = read_specials(dir.path()).unwrap();
        assert_eq!(
            (s.bos_token_id, s.eos_token_id, s.add_bos),
            (Some(5), Some(6), false)
        );
    }
}
