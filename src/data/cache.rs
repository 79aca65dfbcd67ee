//! The on-disk token cache: one directory per key under `data.cache_dir`.
//!
//! The key is xxh3-128 over every input that decides the store's contents: the cache format
//! version, the data format, the settings that format reads (limits, BOS/EOS, vocabulary size,
//! synthetic parameters and seed) and the *contents* of the data files and tokenizer (so
//! renaming a file keeps its cache, editing it makes a new one).
//!
//! A build writes into `cache_dir/.tmp-<key>-<pid>-<nanos>` and renames it to `cache_dir/<key>`;
//! a rename is atomic, so a directory under its key is always complete. When the rename finds
//! the key already there (another rank finished first), the temporary copy is removed and the
//! existing one is used.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use super::{DataError, TokenStore};
use crate::config::{Config, DataFormat, LongDocuments, SyntheticConfig};

/// Bump when the store layout or any reader's output changes, so old caches are not reused.
pub const CACHE_FORMAT_VERSION: u32 = 1;

/// The settings part of the key; fields a format does not read are `None`.
#[derive(Serialize)]
struct KeySettings<'a> {
    version: u32,
    format: DataFormat,
    max_doc_tokens: usize,
    long_documents: LongDocuments,
    vocab_size: usize,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    seed: Option<u64>,
    synthetic: Option<&'a SyntheticConfig>,
    chat_template: Option<&'a str>,
}

/// The cache key of a config: 32 hex digits. Reads every data file and the tokenizer.
pub fn cache_key(config: &Config) -> Result<String, DataError> {
    let d = &config.data;
    let text_format = matches!(
        d.format,
        DataFormat::Text | DataFormat::PromptCompletion | DataFormat::Chat
    );
    let synthetic = d.format == DataFormat::Synthetic;
    let settings = KeySettings {
        version: CACHE_FORMAT_VERSION,
        format: d.format,
        max_doc_tokens: d.max_doc_tokens,
        long_documents: d.long_documents,
        vocab_size: config.model.vocab_size,
        bos_token_id: d.bos_token_id.filter(|_| text_format),
        eos_token_id: d.eos_token_id.filter(|_| text_format),
        seed: synthetic.then_some(config.seed),
        synthetic: synthetic.then_some(&d.synthetic),
        chat_template: d
            .chat_template
            .as_deref()
            .filter(|_| d.format == DataFormat::Chat),
    };
    let settings = serde_json::to_vec(&settings).map_err(|e| DataError::Cache {
        path: d.cache_dir.clone(),
        message: format!("cannot serialise the key settings: {e}"),
    })?;
    let mut key = Xxh3::new();
    key.update(&(settings.len() as u64).to_le_bytes());
    key.update(&settings);
    if !synthetic {
        key.update(&(d.paths.len() as u64).to_le_bytes());
        for path in &d.paths {
            key.update(&hash_file(path)?.to_le_bytes());
        }
    }
    if text_format {
        if let Some(tok) = &d.tokenizer {
            let h = hash_file(tok).map_err(|e| match e {
                DataError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    DataError::TokenizerMissing { path: tok.clone() }
                }
                e => e,
            })?;
            key.update(&h.to_le_bytes());
        }
    }
    Ok(format!("{:032x}", key.digest128()))
}

/// xxh3-128 of a file's contents, streamed.
fn hash_file(path: &Path) -> Result<u128, DataError> {
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(h.digest128());
        }
        h.update(&buf[..n]);
    }
}

/// Map `cache_dir/<key>` if it exists; else `build`, write atomically and map the result.
/// The flag says whether `build` ran.
pub(crate) fn load_or_build(
    config: &Config,
    build: impl FnOnce() -> Result<TokenStore, DataError>,
) -> Result<(TokenStore, bool), DataError> {
    let key = cache_key(config)?;
    let cache_dir = &config.data.cache_dir;
    let dir = cache_dir.join(&key);
    if dir.is_dir() {
        return Ok((open_existing(&dir)?, false));
    }
    let store = build()?;
    std::fs::create_dir_all(cache_dir).map_err(|e| DataError::io(cache_dir, e))?;
    let tmp = temporary_dir(cache_dir, &key);
    if let Err(e) = store.write_to(&tmp) {
        remove_quietly(&tmp);
        return Err(e);
    }
    drop(store);
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        remove_quietly(&tmp);
        if !dir.is_dir() {
            return Err(DataError::Cache {
                path: dir,
                message: format!(
                    "cannot move the new cache from {} into place: {e}",
                    tmp.display()
                ),
            });
        }
        // Another rank renamed its copy first; use that one.
        tracing::debug!(dir = %dir.display(), "token cache built concurrently; using the existing one");
    }
    Ok((open_existing(&dir)?, true))
}

fn open_existing(dir: &Path) -> Result<TokenStore, DataError> {
    TokenStore::open(dir).map_err(|e| {
        let problem = match e {
            DataError::Cache { message, .. } => message,
            other => other.to_string(),
        };
        DataError::Cache {
            path: dir.to_path_buf(),
            message: format!("{problem} (delete this directory to rebuild it)"),
        }
    })
}

fn temporary_dir(cache_dir: &Path, key: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    cache_dir.join(format!(".tmp-{key}-{}-{nanos}", std::process::id()))
}

fn remove_quietly(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not remove a temporary cache directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::write_tiny_tokenizer;
    use crate::data::{build, Document};
    use std::cell::Cell;

    fn text_config(dir: &Path) -> Config {
        let data = dir.join("a.jsonl");
        std::fs::write(
            &data,
            "{\"text\": \"hello world\"}\n{\"text\": \"the cat\"}\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.data.format = DataFormat::Text;
        c.data.paths = vec![data];
        c.data.tokenizer = Some(write_tiny_tokenizer(dir));
        c.data.cache_dir = dir.join("cache");
        c
    }

    fn counting_load(c: &Config, builds: &Cell<usize>) -> TokenStore {
        let before = builds.get();
        let (store, built) = load_or_build(c, || {
            builds.set(builds.get() + 1);
            build(c)
        })
        .unwrap();
        assert_eq!(built, builds.get() > before);
        store
    }

    #[test]
    fn second_load_reuses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let c = text_config(dir.path());
        let builds = Cell::new(0);
        let first = counting_load(&c, &builds);
        let first_dir = first.dir().unwrap().to_path_buf();
        let mtime = |p: &Path| {
            std::fs::metadata(p.join("tokens.u32"))
                .unwrap()
                .modified()
                .unwrap()
        };
        let before = mtime(&first_dir);
        drop(first);
        let second = counting_load(&c, &builds);
        assert_eq!(builds.get(), 1, "the second load must not rebuild");
        assert_eq!(second.dir().unwrap(), first_dir);
        assert_eq!(mtime(&first_dir), before);
        assert_eq!(second.tokens(0), &[4, 5]);
        // Only the keyed directory is left: no temporary copies.
        let entries: Vec<_> = std::fs::read_dir(&c.data.cache_dir).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn key_follows_settings_and_contents_not_paths() {
        let dir = tempfile::tempdir().unwrap();
        let c = text_config(dir.path());
        let base = cache_key(&c).unwrap();
        assert_eq!(base.len(), 32);
        assert_eq!(cache_key(&c).unwrap(), base, "stable");

        let mut changed = Vec::new();
        let mut m = c.clone();
        m.data.max_doc_tokens = 100;
        changed.push(("max_doc_tokens", m));
        let mut m = c.clone();
        m.data.long_documents = LongDocuments::Drop;
        changed.push(("long_documents", m));
        let mut m = c.clone();
        m.data.bos_token_id = Some(1);
        changed.push(("bos_token_id", m));
        let mut m = c.clone();
        m.data.eos_token_id = Some(2);
        changed.push(("eos_token_id", m));
        let mut m = c.clone();
        m.model.vocab_size = 1000;
        changed.push(("vocab_size", m));
        let mut m = c.clone();
        m.data.format = DataFormat::PromptCompletion;
        changed.push(("format", m));
        for (what, m) in changed {
            assert_ne!(cache_key(&m).unwrap(), base, "{what}");
        }

        // Settings the format does not read leave the key alone.
        let mut m = c.clone();
        m.seed += 1;
        m.data.synthetic.num_docs += 1;
        assert_eq!(cache_key(&m).unwrap(), base);

        // The same contents under another name: same key. Other contents: new key.
        let moved = dir.path().join("b.jsonl");
        std::fs::copy(&c.data.paths[0], &moved).unwrap();
        let mut m = c.clone();
        m.data.paths = vec![moved.clone()];
        assert_eq!(cache_key(&m).unwrap(), base);
        std::fs::write(&moved, "{\"text\": \"hello\"}\n").unwrap();
        assert_ne!(cache_key(&m).unwrap(), base);

        // A changed tokenizer file: new key.
        let tok = c.data.tokenizer.clone().unwrap();
        let text = std::fs::read_to_string(&tok).unwrap();
        std::fs::write(&tok, text.replace("\"hello\":4", "\"hello\":14")).unwrap();
        assert_ne!(cache_key(&c).unwrap(), base);
    }

    #[test]
    fn synthetic_key_follows_seed_and_parameters() {
        let c = Config::default();
        let base = cache_key(&c).unwrap();
        let mut m = c.clone();
        m.seed += 1;
        assert_ne!(cache_key(&m).unwrap(), base);
        let mut m = c.clone();
        m.data.synthetic.sigma = 0.5;
        assert_ne!(cache_key(&m).unwrap(), base);
        let mut m = c.clone();
        m.data.bos_token_id = Some(1); // not read by the synthetic corpus
        assert_eq!(cache_key(&m).unwrap(), base);
    }

    #[test]
    fn an_existing_key_directory_is_used_not_overwritten() {
        // As if another rank renamed its copy into place first.
        let dir = tempfile::tempdir().unwrap();
        let c = text_config(dir.path());
        let keyed = c.data.cache_dir.join(cache_key(&c).unwrap());
        TokenStore::from_documents(&[Document::new(vec![9, 9, 9])])
            .write_to(&keyed)
            .unwrap();
        let builds = Cell::new(0);
        let s = counting_load(&c, &builds);
        assert_eq!(builds.get(), 0);
        assert_eq!(s.tokens(0), &[9, 9, 9]);
    }

    #[test]
    fn a_corrupt_cache_names_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let c = text_config(dir.path());
        let keyed = c.data.cache_dir.join(cache_key(&c).unwrap());
        std::fs::create_dir_all(&keyed).unwrap();
        let e = load_or_build(&c, || build(&c)).unwrap_err().to_string();
        assert!(
            e.contains(&keyed.display().to_string()) && e.contains("delete"),
            "{e}"
        );
    }

    #[test]
    fn missing_data_file_or_tokenizer_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = text_config(dir.path());
        c.data.tokenizer = Some(dir.path().join("nope/tokenizer.json"));
        let e = cache_key(&c).unwrap_err();
        assert!(matches!(e, DataError::TokenizerMissing { .. }), "{e:?}");
        assert!(e.to_string().contains("nope/tokenizer.json"));
        c.data.paths = vec![dir.path().join("missing.jsonl")];
        let e = cache_key(&c).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }
}
