//! KV-cache block accounting. A [`Block`] is an owning handle to one block id of the paged KV
//! store; clones share it (a prefix shared by several sequences, or held by the prefix cache) and
//! the id returns to the free list when the last handle drops, so a block cannot leak.
//!
//! Single-threaded by design: only the engine thread allocates and frees, so there is no lock.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

struct Pool {
    free: Vec<u32>,
    total: usize,
}

/// Allocates block ids out of a fixed number of blocks.
#[derive(Clone)]
pub struct BlockPool {
    pool: Rc<RefCell<Pool>>,
}

impl BlockPool {
    pub fn new(total: usize) -> Self {
        // Reversed so low ids come out first: easier to read in logs and tests.
        let free = (0..total as u32).rev().collect();
        BlockPool { pool: Rc::new(RefCell::new(Pool { free, total })) }
    }

    /// A free block, or `None` when every block is owned.
    pub fn allocate(&self) -> Option<Block> {
        let id = self.pool.borrow_mut().free.pop()?;
        Some(Block(Rc::new(BlockInner { id, pool: self.pool.clone() })))
    }

    pub fn free_count(&self) -> usize {
        self.pool.borrow().free.len()
    }

    pub fn total(&self) -> usize {
        self.pool.borrow().total
    }
}

struct BlockInner {
    id: u32,
    pool: Rc<RefCell<Pool>>,
}

impl Drop for BlockInner {
    fn drop(&mut self) {
        self.pool.borrow_mut().free.push(self.id);
    }
}

/// Shared ownership of one KV block.
#[derive(Clone)]
pub struct Block(Rc<BlockInner>);

impl Block {
    pub fn id(&self) -> u32 {
        self.0.id
    }

    /// How many handles (sequences, prefix cache) own this block.
    pub fn owners(&self) -> usize {
        Rc::strong_count(&self.0)
    }
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Block({}, owners {})", self.id(), self.owners())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_return_when_the_last_owner_drops() {
        let pool = BlockPool::new(3);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!((a.id(), b.id(), pool.free_count()), (0, 1, 1));
        let shared = a.clone();
        assert_eq!(a.owners(), 2);
        drop(a);
        assert_eq!(pool.free_count(), 1, "still owned by the clone");
        drop(shared);
        assert_eq!(pool.free_count(), 2);
        let c = pool.allocate().unwrap();
        let d = pool.allocate().unwrap();
        assert!(pool.allocate().is_none());
        drop((b, c, d));
        assert_eq!(pool.free_count(), 3);
    }
}
