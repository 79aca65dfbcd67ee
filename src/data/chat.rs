//! JSONL `{"messages": [{"role": "user", "content": "..."}, ...]}`: conversations rendered by
//! `data.chat_template`, with only the assistant turns in the loss.
//!
//! The template language (documented in README.md) is per-role prefix/suffix strings:
//!
//! ```text
//! template := preamble section+
//! section  := "{@" role "}" body      body holds exactly one "{content}"
//! ```
//! e.g. `"<s>{@system}<|system|>\n{content}\n{@user}<|user|>\n{content}\n{@assistant}<|assistant|>\n{content}<|end|>\n"`.
//! The preamble (text before the first section, often empty) starts every conversation; each
//! message becomes its role's body with `{content}` replaced by the message's content. `{{` and
//! `}}` are literal braces; any other `{...}` is an error. An `assistant` section is required.
//!
//! Labels: the tokens of an assistant message's content *and* of the rest of its body (its end
//! marker, e.g. `<|end|>\n`) are labels; everything else (preamble, other roles, the assistant
//! prefix) is not. The whole conversation is rendered to one string and tokenised once, as
//! transformers' `apply_chat_template(..., tokenize=True)` would; a token is a label when its
//! first byte lies in a labelled span (so a token merged across the boundary goes with its start).

use std::ops::Range;
use std::path::Path;

use super::reader::{kind_of, Reader, Record};
use super::{DataError, Document};

/// A template that does not parse: what is wrong and where (byte offset into the template).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("unknown placeholder `{{{name}}}` at byte {at} (allowed: `{{@role}}`, `{{content}}`, `{{{{`, `}}}}`)")]
    UnknownPlaceholder { name: String, at: usize },
    #[error("unclosed `{{` at byte {at} (write `{{{{` for a literal brace)")]
    Unclosed { at: usize },
    #[error("lone `}}` at byte {at} (write `}}}}` for a literal brace)")]
    LoneClose { at: usize },
    #[error("`{{content}}` at byte {at} is outside any `{{@role}}` section")]
    ContentInPreamble { at: usize },
    #[error("section `{{@{role}}}` has no `{{content}}`")]
    NoContent { role: String },
    #[error("section `{{@{role}}}` has more than one `{{content}}`")]
    TwoContents { role: String },
    #[error("role `{role}` has two sections")]
    DuplicateRole { role: String },
    #[error("`{{@}}` at byte {at} names no role")]
    EmptyRole { at: usize },
    #[error("no `{{@assistant}}` section: nothing would be trained")]
    NoAssistant,
}

/// One role's text around the content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    role: String,
    prefix: String,
    suffix: String,
}

/// A parsed `data.chat_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    preamble: String,
    sections: Vec<Section>,
}

/// One `{role, content}` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// The role whose turns are trained.
pub const ASSISTANT: &str = "assistant";

impl ChatTemplate {
    /// Parse a template (see the module doc).
    pub fn parse(template: &str) -> Result<Self, ChatTemplateError> {
        // Current section: (role, prefix, Some(suffix) once `{content}` was seen).
        let mut preamble = String::new();
        let mut current: Option<(String, String, Option<String>)> = None;
        let mut sections: Vec<Section> = Vec::new();
        let finish = |cur: Option<(String, String, Option<String>)>,
                      sections: &mut Vec<Section>|
         -> Result<(), ChatTemplateError> {
            let Some((role, prefix, suffix)) = cur else {
                return Ok(());
            };
            let suffix =
                suffix.ok_or_else(|| ChatTemplateError::NoContent { role: role.clone() })?;
            if sections.iter().any(|s| s.role == role) {
                return Err(ChatTemplateError::DuplicateRole { role });
            }
            sections.push(Section {
                role,
                prefix,
                suffix,
            });
            Ok(())
        };
        let bytes = template.as_bytes();
        let mut i = 0;
        while i < template.len() {
            let rest = &template[i..];
            let literal: &str;
            if rest.starts_with("{{") {
                literal = "{";
                i += 2;
            } else if rest.starts_with("}}") {
                literal = "}";
                i += 2;
            } else if bytes[i] == b'}' {
                return Err(ChatTemplateError::LoneClose { at: i });
            } else if bytes[i] == b'{' {
                let close = rest
                    .find('}')
                    .ok_or(ChatTemplateError::Unclosed { at: i })?;
                let name = &rest[1..close];
                let at = i;
                i += close + 1;
                if let Some(role) = name.strip_prefix('@') {
                    let role = role.trim();
                    if role.is_empty() {
                        return Err(ChatTemplateError::EmptyRole { at });
                    }
                    finish(current.take(), &mut sections)?;
                    current = Some((role.to_string(), String::new(), None));
                    continue;
                }
                if name != "content" {
                    return Err(ChatTemplateError::UnknownPlaceholder {
                        name: name.to_string(),
                        at,
                    });
                }
                match &mut current {
                    None => return Err(ChatTemplateError::ContentInPreamble { at }),
                    Some((role, _, Some(_))) => {
                        return Err(ChatTemplateError::TwoContents { role: role.clone() })
                    }
                    Some((_, _, suffix)) => *suffix = Some(String::new()),
                }
                continue;
            } else {
                // Copy up to the next brace in one go.
                let n = rest.find(['{', '}']).unwrap_or(rest.len());
                literal = &rest[..n];
                i += n;
            }
            match &mut current {
                None => preamble.push_str(literal),
                Some((_, prefix, None)) => prefix.push_str(literal),
                Some((_, _, Some(suffix))) => suffix.push_str(literal),
            }
        }
        finish(current, &mut sections)?;
        if !sections.iter().any(|s| s.role == ASSISTANT) {
            return Err(ChatTemplateError::NoAssistant);
        }
        Ok(Self { preamble, sections })
    }

    /// The roles with a section, in template order.
    pub fn roles(&self) -> Vec<&str> {
        self.sections.iter().map(|s| s.role.as_str()).collect()
    }

    /// Render a conversation: the text and the byte ranges of it that are labels (assistant
    /// content plus end marker), ascending. An unknown role is an error naming it.
    pub fn render(&self, messages: &[Message<'_>]) -> Result<(String, Vec<Range<usize>>), String> {
        let mut text = self.preamble.clone();
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let section = self
                .sections
                .iter()
                .find(|s| s.role == m.role)
                .ok_or_else(|| {
                    format!(
                        "[{i}].role = {:?} has no section in data.chat_template (roles: {})",
                        m.role,
                        self.roles().join(", ")
                    )
                })?;
            text.push_str(&section.prefix);
            let start = text.len();
            text.push_str(m.content);
            text.push_str(&section.suffix);
            if m.role == ASSISTANT && text.len() > start {
                spans.push(start..text.len());
            }
        }
        Ok((text, spans))
    }
}

/// The chat reader: a template and a tokenizer (used with offsets, to place the labels).
pub(crate) struct ChatReader {
    template: ChatTemplate,
    tokenizer: tokenizers::Tokenizer,
}

impl ChatReader {
    /// Load `tokenizer.json` from `path` and parse `template`.
    pub fn load(path: &Path, template: &str) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::TokenizerMissing {
                path: path.to_path_buf(),
            },
            _ => DataError::io(path, e),
        })?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        // Config validation parses the template first; this only fails for a hand-made config.
        let template = ChatTemplate::parse(template).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("data.chat_template: {e}"),
        })?;
        Ok(Self {
            template,
            tokenizer,
        })
    }
}

/// Label bit of each token: set when the token's first byte lies in one of `spans` (ascending).
fn label_bits(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
        .collect()
}

impl Reader for ChatReader {
    fn read(&self, record: &Record<'_>) -> Result<Document, DataError> {
        const FIELD: &str = "messages";
        let list = record.array_field(FIELD)?;
        let mut messages = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let text_of = |key: &str| -> Result<&str, DataError> {
                match m.get(key) {
                    Some(serde_json::Value::String(s)) => Ok(s.as_str()),
                    Some(v) => Err(record.bad_field(
                        FIELD,
                        format!("[{i}].{key} must be a string, found {}", kind_of(v)),
                    )),
                    None if !m.is_object() => Err(record.bad_field(
                        FIELD,
                        format!("[{i}] must be an object, found {}", kind_of(m)),
                    )),
                    None => Err(record.bad_field(FIELD, format!("[{i}] has no `{key}`"))),
                }
            };
            messages.push(Message {
                role: text_of("role")?,
                content: text_of("content")?,
            });
        }
        let (text, spans) = self
            .template
            .render(&messages)
            .map_err(|message| record.bad_field(FIELD, message))?;
        let encoding =
            self.tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| DataError::Tokenize {
                    path: record.origin.path.to_path_buf(),
                    line: record.origin.line,
                    message: e.to_string(),
                })?;
        let labels = label_bits(encoding.get_offsets(), &spans);
        Ok(Document {
            tokens: encoding.get_ids().to_vec(),
            labels: Some(labels),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DataFormat};
    use crate::data::reader::read_file;

    const TEMPLATE: &str = "{@user}<u> {content} {@assistant}<a> {content} <e> ";

    /// A word-level tokenizer that knows the template's markers: `<u>`=20, `<a>`=21, `<e>`=22,
    /// `<sys>`=23, words as in `write_tiny_tokenizer` (hello=4, world=5, the=6, cat=7, sat=8).
    fn write_chat_tokenizer(dir: &Path) -> std::path::PathBuf {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": { "type": "WhitespaceSplit" },
            "post_processor": null, "decoder": null,
            "model": { "type": "WordLevel", "unk_token": "[UNK]", "vocab": {
                "[UNK]": 3, "hello": 4, "world": 5, "the": 6, "cat": 7, "sat": 8,
                "<u>": 20, "<a>": 21, "<e>": 22, "<sys>": 23 } }
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    fn read(lines: &str) -> Result<Vec<Document>, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let reader = ChatReader::load(&write_chat_tokenizer(dir.path()), TEMPLATE).unwrap();
        let path = dir.path().join("chat.jsonl");
        std::fs::write(&path, lines).unwrap();
        let mut docs = Vec::new();
        read_file(&path, &reader, |d, _| {
            docs.push(d);
            Ok(())
        })?;
        Ok(docs)
    }

    #[test]
    fn template_parses_into_sections() {
        let t = ChatTemplate::parse(
            "<s>{@system}S{content}\n{@user}U{{x}}{content}!{@assistant}A{content}</s>",
        )
        .unwrap();
        assert_eq!(t.preamble, "<s>");
        assert_eq!(t.roles(), vec!["system", "user", "assistant"]);
        assert_eq!(t.sections[1].prefix, "U{x}");
        assert_eq!(t.sections[1].suffix, "!");
        assert_eq!(t.sections[2].suffix, "</s>");
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        use ChatTemplateError as E;
        for (t, want) in [
            ("{@user}{content}", E::NoAssistant),
            (
                "{@assistant}x",
                E::NoContent {
                    role: "assistant".into(),
                },
            ),
            (
                "{@assistant}{content}{content}",
                E::TwoContents {
                    role: "assistant".into(),
                },
            ),
            (
                "{@assistant}{content}{@assistant}{content}",
                E::DuplicateRole {
                    role: "assistant".into(),
                },
            ),
            (
                "{content}{@assistant}{content}",
                E::ContentInPreamble { at: 0 },
            ),
            (
                "{@assistant}{role}{content}",
                E::UnknownPlaceholder {
                    name: "role".into(),
                    at: 12,
                },
            ),
            ("{@assistant}{content", E::Unclosed { at: 12 }),
            ("{@assistant}{content}}", E::LoneClose { at: 21 }),
            ("{@}{@assistant}{content}", E::EmptyRole { at: 0 }),
        ] {
            assert_eq!(ChatTemplate::parse(t).unwrap_err(), want, "{t}");
        }
    }

    #[test]
    fn render_marks_assistant_content_and_end_marker() {
        let t =
            ChatTemplate::parse("<s>{@user}[U]{content}\n{@assistant}[A]{content}<e>\n").unwrap();
        let (text, spans) = t
            .render(&[
                Message {
                    role: "user",
                    content: "hi",
                },
                Message {
                    role: "assistant",
                    content: "yo",
                },
                Message {
                    role: "user",
                    content: "q",
                },
                Message {
                    role: "assistant",
                    content: "",
                },
            ])
            .unwrap();
        assert_eq!(text, "<s>[U]hi\n[A]yo<e>\n[U]q\n[A]<e>\n");
        let labelled: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(labelled, vec!["yo<e>\n", "<e>\n"]);
        let e = t
            .render(&[Message {
                role: "tool",
                content: "x",
            }])
            .unwrap_err();
        assert!(
            e.contains("\"tool\"") && e.contains("user, assistant"),
            "{e}"
        );
    }

    #[test]
    fn only_assistant_turns_are_labels() {
        let docs = read(concat!(
            r#"{"messages": [{"role": "user", "content": "hello world"}, "#,
            r#"{"role": "assistant", "content": "the cat"}, "#,
            r#"{"role": "user", "content": "sat"}, {"role": "assistant", "content": "world"}]}"#,
            "\n"
        ))
        .unwrap();
        let d = &docs[0];
        //                  <u> hello world <a> the cat <e> <u> sat <a> world <e>
        assert_eq!(d.tokens, vec![20, 4, 5, 21, 6, 7, 22, 20, 8, 21, 5, 22]);
        let labels: Vec<bool> = (0..d.len()).map(|i| d.is_label(i)).collect();
        let (f, t) = (false, true);
        assert_eq!(labels, vec![f, f, f, f, t, t, t, f, f, f, t, t]);
    }

    #[test]
    fn bad_messages_name_file_line_and_what() {
        for (line, want) in [
            (r#"{"messages": "hi"}"#, "field `messages` must be an array"),
            (r#"{"msgs": []}"#, "missing field `messages`"),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "[0] has no `content`",
            ),
            (
                r#"{"messages": [{"role": 1, "content": "x"}]}"#,
                "[0].role must be a string, found a number",
            ),
            (r#"{"messages": [3]}"#, "[0] must be an object"),
            (
                r#"{"messages": [{"role": "system", "content": "x"}]}"#,
                "[0].role = \"system\" has no section",
            ),
        ] {
            let e = read(&format!("{{\"messages\": []}}\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("chat.jsonl:2:") && e.contains(want),
                "{line} gave {e}"
            );
        }
    }

    #[test]
    fn through_load_bos_is_added_and_no_eos() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("chat.jsonl");
        std::fs::write(
            &data,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}, {\"role\": \"assistant\", \"content\": \"cat\"}]}\n{\"messages\": []}\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.data.format = DataFormat::Chat;
        c.data.paths = vec![data];
        c.data.tokenizer = Some(write_chat_tokenizer(dir.path()));
        c.data.chat_template = Some(TEMPLATE.into());
        c.data.bos_token_id = Some(1);
        c.data.eos_token_id = Some(2);
        c.validate().unwrap();
        let s = crate::data::build(&c).unwrap();
        assert_eq!(s.num_docs(), 1);
        assert_eq!(s.report().empty_skipped, 1);
        assert_eq!(s.tokens(0), &[1, 20, 4, 21, 7, 22]);
        let labels: Vec<bool> = (0..6).map(|i| s.is_label(0, i)).collect();
        assert_eq!(labels, vec![false, false, false, false, true, true]);
    }
}
