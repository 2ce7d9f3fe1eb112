//! Generation-checked handles: a handle is `kind << 56 | generation << 24 | index`,
//! so a freed, forged or wrong-kind handle is recognised and refused.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::status::{Error, avp_status};

const INDEX_BITS: u32 = 24;
const GEN_BITS: u32 = 32;

/// A slot: its generation and, while live, its object.
type Slot<T> = (u32, Option<Arc<Mutex<T>>>);

/// One table of live objects of one kind.
pub(crate) struct Table<T> {
    kind: u8,
    name: &'static str,
    slots: Mutex<Vec<Slot<T>>>,
}

impl<T> Table<T> {
    pub const fn new(kind: u8, name: &'static str) -> Table<T> {
        Table {
            kind,
            name,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot<T>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Store `value`; return its handle id (never 0).
    pub fn insert(&self, value: T) -> Result<u64, Error> {
        let mut slots = self.lock();
        let index = match slots.iter().position(|(_, v)| v.is_none()) {
            Some(i) => i,
            None => {
                if slots.len() >= (1 << INDEX_BITS) - 1 {
                    return Err(Error::new(
                        avp_status::AVP_ERR_BUSY,
                        format!("too many live {} handles", self.name),
                    ));
                }
                slots.push((0, None));
                slots.len() - 1
            }
        };
        let slot = &mut slots[index];
        slot.0 = slot.0.wrapping_add(1).max(1);
        slot.1 = Some(Arc::new(Mutex::new(value)));
        Ok(((self.kind as u64) << 56) | ((slot.0 as u64) << INDEX_BITS) | index as u64)
    }

    fn locate(&self, id: u64) -> Result<(usize, u32), Error> {
        let bad = || {
            Error::new(
                avp_status::AVP_ERR_INVALID_HANDLE,
                format!(
                    "not a live {} handle (0x{id:016x}): never issued, already freed, or of another kind",
                    self.name
                ),
            )
        };
        if (id >> 56) as u8 != self.kind {
            return Err(bad());
        }
        let generation = ((id >> INDEX_BITS) & ((1u64 << GEN_BITS) - 1)) as u32;
        let index = (id & ((1 << INDEX_BITS) - 1)) as usize;
        let slots = self.lock();
        match slots.get(index) {
            Some((g, Some(_))) if *g == generation => Ok((index, generation)),
            _ => Err(bad()),
        }
    }

    /// The object behind a handle.
    pub fn get(&self, id: u64) -> Result<Arc<Mutex<T>>, Error> {
        let (index, _) = self.locate(id)?;
        Ok(self.lock()[index].1.clone().expect("located"))
    }

    /// Remove a handle's object if `can_remove` agrees; the handle is dead afterwards.
    ///
    /// The object is locked for `can_remove` without the table's lock held, so
    /// waiting for an object in use (a sender in the middle of a send, say)
    /// never holds up calls on other objects.
    pub fn remove_if(
        &self,
        id: u64,
        can_remove: impl FnOnce(&T) -> Result<(), Error>,
    ) -> Result<Arc<Mutex<T>>, Error> {
        let obj = self.get(id)?;
        {
            let guard = obj.lock().unwrap_or_else(|e| e.into_inner());
            can_remove(&guard)?;
        }
        let (index, generation) = self.locate(id)?;
        let mut slots = self.lock();
        let slot = &mut slots[index];
        let same = slot.0 == generation && slot.1.as_ref().is_some_and(|o| Arc::ptr_eq(o, &obj));
        if !same {
            return Err(Error::new(
                avp_status::AVP_ERR_INVALID_HANDLE,
                format!("{} handle freed concurrently", self.name),
            ));
        }
        Ok(slot.1.take().expect("located"))
    }
}

/// Lock an object, recovering from a poisoned lock (a panic was already reported).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
