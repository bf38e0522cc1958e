//! The last accepted description of a listener, kept parsed, so that the next migration whose
//! source sends the same description text does not parse (and check) it again while both QEMUs
//! wait.
//!
//! A QEMU of one configuration sends the same description on every migration (same devices,
//! same field sizes, same cpreg counts). The cache keeps one entry: the text, its parsed
//! [`Shape`], and the reference description it was found to match, if any. A received
//! description is looked up by its bytes (length first, then one comparison of all of them);
//! only an exact match is used.
//!
//! Why a hit is equivalent to a miss by construction: the parse and the reference check are
//! functions of the description's bytes (and of the reference) alone. The same bytes in give the
//! same shape out, and the same shape against the same reference gives the same answer, so using
//! the kept results changes nothing that is accepted or refused. Everything that depends on the
//! stream (the walk of the device state against the description) runs on every migration. A
//! description that failed the parse, the check or the walk never enters the cache.
//!
//! The entry also keeps the walk plan compiled from the text (`walk_plan.rs`): a hit walks the
//! stream with it instead of looking every field up by name in the parse. The plan is compiled
//! once per entry, when nobody waits ([`DescriptionCache::prepare`], which the proxy calls once a
//! device state has been released) or else by the first hit.
//!
//! Memory: one entry, whose text passed the decoder's description budget (`Limits::
//! max_description`) and whose shape and plan are a few words per JSON value of that text.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::json::{self, Document, Shape};
use crate::reference::{LayoutMismatch, ReferenceDescription};
use crate::walk_plan::WalkPlan;

/// One listener's description cache: a cheap handle, cloned into each migration's decoder and
/// shared by all of them.
#[derive(Debug, Clone, Default)]
pub struct DescriptionCache {
    entry: Arc<Mutex<Option<Arc<CachedDescription>>>>,
}

/// A description text and what was derived from it alone.
#[derive(Debug)]
pub(crate) struct CachedDescription {
    text: Box<[u8]>,
    shape: Shape,
    /// The walk compiled from it (`walk_plan.rs`; `None`: the description has a defect the
    /// walk reports by lookup). Compiled once, by [`DescriptionCache::prepare`] (after the
    /// migration that stored it has released its device state) or by the first hit.
    plan: OnceLock<Option<WalkPlan>>,
    /// The reference the description was checked against and matched (`None`: not checked).
    matched_reference: Option<ReferenceDescription>,
}

impl CachedDescription {
    /// The kept shape paired with `text`, which the lookup found equal to the kept text.
    pub(crate) fn document<'a>(&'a self, text: &'a [u8]) -> Option<Document<'a>> {
        Document::with_shape(text, &self.shape)
    }

    /// The walk plan compiled from the kept text (compiled now if it was not yet).
    pub(crate) fn plan(&self) -> Option<&WalkPlan> {
        self.plan
            .get_or_init(|| {
                let document = Document::with_shape(&self.text, &self.shape)?;
                WalkPlan::compile(document.root())
            })
            .as_ref()
    }

    /// Whether the reference check for `reference` has already been passed by this text (no
    /// reference: nothing to check).
    pub(crate) fn checked_for(&self, reference: Option<&ReferenceDescription>) -> bool {
        match reference {
            None => true,
            Some(reference) => self
                .matched_reference
                .as_ref()
                .is_some_and(|matched| matched.is_same(reference)),
        }
    }
}

impl DescriptionCache {
    /// An empty cache (a checking relay's: it fills from the first accepted migration).
    pub fn new() -> Self {
        Self::default()
    }

    /// Seed the cache with a reference description's own text, checked against itself: a
    /// rewriting relay whose source sends that description (the normal case) reuses it from the
    /// first migration on.
    pub fn seed(
        &self,
        text: &[u8],
        reference: &ReferenceDescription,
    ) -> Result<(), LayoutMismatch> {
        let document = json::parse(text).map_err(|e| {
            LayoutMismatch(format!(
                "reference description: not valid json at byte {}: {}",
                e.pos, e.message
            ))
        })?;
        reference.check(document.root())?;
        self.store(text, document.into_shape(), Some(reference));
        self.prepare();
        Ok(())
    }

    /// Compile the walk plan of the kept description if that has not been done: called when
    /// nobody waits (after a device state has been released), so that the next migration's hit
    /// finds it ready instead of compiling it while both QEMUs are stopped.
    pub fn prepare(&self) {
        let entry = self
            .entry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(entry) = entry {
            // Compiled outside the lock.
            let _ = entry.plan();
        }
    }

    /// The kept entry if its text is byte-for-byte `text`.
    pub(crate) fn lookup(&self, text: &[u8]) -> Option<Arc<CachedDescription>> {
        let entry = self
            .entry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        // Compared outside the lock (a reference count keeps the entry alive).
        (entry.text.len() == text.len() && *entry.text == *text).then_some(entry)
    }

    /// Replace the entry with an accepted description: its text, its shape, and the reference
    /// it matched (if it was checked against one). Its walk plan is compiled later
    /// ([`prepare`](Self::prepare)): the migration storing it is still holding both QEMUs.
    pub(crate) fn store(&self, text: &[u8], shape: Shape, matched: Option<&ReferenceDescription>) {
        let entry = Arc::new(CachedDescription {
            text: text.into(),
            shape,
            plan: OnceLock::new(),
            matched_reference: matched.cloned(),
        });
        *self.entry.lock().unwrap_or_else(PoisonError::into_inner) = Some(entry);
    }

    /// Length of the kept description text (`None`: the cache is empty).
    pub fn cached_len(&self) -> Option<usize> {
        self.entry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|entry| entry.text.len())
    }
}
