//! The cache-aware policy's picture of what each group's KV cache holds: a radix tree over prompt
//! token ids, each node remembering which groups were sent that prefix and at which logical time.
//!
//! Memory has a hard bound. [`PrefixTree::tree_bytes`] is
//!
//! ```text
//! nodes.capacity() * size_of::<Node>()          // the arena (80 bytes a slot on 64-bit targets)
//!   + Σ over nodes: label.len() * 4              // edge labels are exact-size boxed slices
//!                 + children.capacity() * 8      // (first token, node id) pairs
//!                 + groups.capacity() * 16       // (group id, last access) pairs
//! ```
//!
//! which is every allocation the tree owns except the group table (one entry per group ever
//! inserted and not removed: bounded by the pool, not by traffic). After an insert that leaves it
//! above `max_bytes`, least recently used leaves are evicted in one batch down to 90% of the
//! bound, then the arena is compacted; the batch costs O(nodes log nodes) (about 10 ms for a 64 MiB
//! tree in a release build) but comes once per tenth of the bound inserted, so an insert costs
//! O(prompt + log nodes) amortised.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::mem::size_of;
use std::sync::Arc;

use rustc_hash::FxHashMap;

type NodeId = u32;
type GroupId = u32;

const ROOT: NodeId = 0;
const NO_PARENT: NodeId = NodeId::MAX;
/// Below this the tree is disabled: it could not hold the root plus one useful prefix.
const MIN_TREE_BYTES: usize = 1024;
/// Larger bounds are clamped here, where the node count (≥ 80 bytes each) still fits a u32 id.
const MAX_TREE_BYTES: usize = 1 << 38;
const CHILD_BYTES: usize = size_of::<(u32, NodeId)>();
const GROUP_BYTES: usize = size_of::<(GroupId, u64)>();

struct Node {
    /// Tokens on the edge from the parent; empty only at the root.
    label: Box<[u32]>,
    parent: NodeId,
    /// Sorted by first token. A Vec rather than a map: most nodes have a handful of children and
    /// its bytes are exactly `capacity * 8`.
    children: Vec<(u32, NodeId)>,
    /// Groups that were sent this prefix, with the clock of their latest such request. A group in
    /// a node is also in all its ancestors, so eviction of leaves never breaks a group's path.
    groups: Vec<(GroupId, u64)>,
    /// Latest access by any group; what LRU eviction orders leaves by.
    last_access: u64,
}

impl Node {
    fn heap_bytes(&self) -> usize {
        self.label.len() * 4 + self.children.capacity() * CHILD_BYTES + self.groups.capacity() * GROUP_BYTES
    }

    fn child(&self, token: u32) -> Option<NodeId> {
        self.children.binary_search_by_key(&token, |c| c.0).ok().map(|i| self.children[i].1)
    }
}

struct GroupEntry {
    /// Σ label lengths of the nodes holding this group: how much of the tree it occupies.
    tokens: usize,
}

pub struct PrefixTree {
    max_bytes: usize,
    /// Arena; index 0 is the root whenever the tree is enabled, empty when it is not.
    nodes: Vec<Node>,
    /// Σ `Node::heap_bytes` over `nodes`, kept up to date by every mutation.
    heap_bytes: usize,
    groups: Vec<Option<GroupEntry>>,
    group_ids: FxHashMap<Arc<str>, GroupId>,
    /// Logical clock, one tick per insert: replicas and restarts need no synchronised wall time.
    clock: u64,
}

impl PrefixTree {
    pub fn new(max_bytes: usize) -> Self {
        let max_bytes = max_bytes.min(MAX_TREE_BYTES);
        let mut tree = PrefixTree {
            max_bytes,
            nodes: Vec::new(),
            heap_bytes: 0,
            groups: Vec::new(),
            group_ids: FxHashMap::default(),
            clock: 0,
        };
        if max_bytes >= MIN_TREE_BYTES {
            tree.nodes.reserve_exact(1);
            tree.nodes.push(Node {
                label: Box::new([]),
                parent: NO_PARENT,
                children: Vec::new(),
                groups: Vec::new(),
                last_access: 0,
            });
        }
        tree
    }

    /// Bytes the tree owns now (see the module docs); never above `max_bytes` between calls.
    pub fn tree_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<Node>() + self.heap_bytes
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Tokens of the tree that `group` holds: the policy sends new prefixes to the group holding
    /// least, to spread them.
    pub fn cached_tokens(&self, group: &str) -> usize {
        self.group_id(group).and_then(|g| self.groups[g as usize].as_ref()).map_or(0, |e| e.tokens)
    }

    /// How many leading tokens of `tokens` were sent to `group` (as far as the tree remembers).
    pub fn matched_len(&self, group: &str, tokens: &[u32]) -> usize {
        self.match_lengths(tokens, &[group])[0]
    }

    /// [`matched_len`](Self::matched_len) for each of `groups`, in one walk down the tree.
    pub fn match_lengths(&self, tokens: &[u32], groups: &[&str]) -> Vec<usize> {
        let mut lengths = vec![0; groups.len()];
        if self.nodes.is_empty() {
            return lengths;
        }
        // Group id → index in `groups`; duplicates in `groups` are filled in afterwards.
        let mut slot = vec![usize::MAX; self.groups.len()];
        let ids: Vec<Option<u32>> = groups.iter().map(|g| self.group_id(g)).collect();
        for (i, id) in ids.iter().enumerate() {
            if let Some(id) = *id {
                if slot[id as usize] == usize::MAX {
                    slot[id as usize] = i;
                }
            }
        }
        let mut node = ROOT;
        let mut depth = 0;
        while let Some(child) = tokens.get(depth).and_then(|&t| self.nodes[node as usize].child(t)) {
            let c = &self.nodes[child as usize];
            let common = common_prefix(&c.label, &tokens[depth..]);
            depth += common;
            // Deeper nodes hold a subset of their ancestors' groups, so overwriting leaves each
            // group's deepest match.
            for &(g, _) in &c.groups {
                if let Some(&i) = slot.get(g as usize).filter(|&&i| i != usize::MAX) {
                    lengths[i] = depth;
                }
            }
            if common < c.label.len() {
                break;
            }
            node = child;
        }
        // Linear in the groups: a repeated group takes its first occurrence's length.
        for (i, id) in ids.iter().enumerate() {
            if let Some(first) = id.map(|id| slot[id as usize]).filter(|&first| first != i) {
                lengths[i] = lengths[first];
            }
        }
        lengths
    }

    /// Records that `tokens` were sent to `group`, then evicts down under the bound. A prompt
    /// longer than half the bound is recorded up to that length: matching a longer prefix would
    /// not change a decision, and it would otherwise push everything else out.
    pub fn insert(&mut self, tokens: &[u32], group: &str) {
        if self.nodes.is_empty() || tokens.is_empty() {
            return;
        }
        let tokens = &tokens[..tokens.len().min(self.max_bytes / 8)];
        self.clock += 1;
        let now = self.clock;
        let gid = self.intern(group);
        let mut node = ROOT;
        let mut pos = 0;
        while pos < tokens.len() {
            let Some(child) = self.nodes[node as usize].child(tokens[pos]) else {
                self.add_leaf(node, &tokens[pos..], gid, now);
                break;
            };
            let common = common_prefix(&self.nodes[child as usize].label, &tokens[pos..]);
            let next = if common < self.nodes[child as usize].label.len() { self.split(child, common) } else { child };
            self.touch(next, gid, now);
            pos += common;
            node = next;
        }
        if self.tree_bytes() > self.max_bytes {
            self.evict();
        }
    }

    /// Forgets `group` everywhere; prefixes no other group holds are dropped.
    pub fn remove_group(&mut self, group: &str) {
        let Some(gid) = self.group_ids.remove(group) else { return };
        self.groups[gid as usize] = None;
        let mut dead = vec![false; self.nodes.len()];
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let before = node.groups.len();
            node.groups.retain(|&(g, _)| g != gid);
            if node.groups.len() != before {
                node.groups.shrink_to_fit();
            }
            // Ancestors hold every group their descendants do, so the emptied nodes are whole
            // subtrees and dropping them leaves no orphans.
            dead[i] = i != ROOT as usize && node.groups.is_empty();
        }
        self.compact(&dead);
    }

    fn group_id(&self, group: &str) -> Option<GroupId> {
        self.group_ids.get(group).copied()
    }

    fn intern(&mut self, group: &str) -> GroupId {
        if let Some(id) = self.group_id(group) {
            return id;
        }
        let name: Arc<str> = group.into();
        let entry = Some(GroupEntry { tokens: 0 });
        let id = match self.groups.iter().position(Option::is_none) {
            Some(free) => {
                self.groups[free] = entry;
                free
            }
            None => {
                self.groups.push(entry);
                self.groups.len() - 1
            }
        };
        // More than 2^32 live groups cannot happen: each needs a connected worker group.
        let id = id as GroupId;
        self.group_ids.insert(name, id);
        id
    }

    fn add_tokens(&mut self, gid: GroupId, delta: usize) {
        if let Some(Some(entry)) = self.groups.get_mut(gid as usize) {
            entry.tokens = entry.tokens.saturating_add(delta);
        }
    }

    /// Appends a node to the arena, growing it by an eighth at a time rather than doubling so its
    /// spare capacity (which counts against the bound) stays small.
    fn push_node(&mut self, node: Node) -> NodeId {
        if self.nodes.len() == self.nodes.capacity() {
            self.nodes.reserve_exact((self.nodes.len() / 8).max(16));
        }
        self.heap_bytes += node.heap_bytes();
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    /// Runs `f` on a node, keeping `heap_bytes` in step with whatever it allocates or frees.
    fn edit<R>(&mut self, id: NodeId, f: impl FnOnce(&mut Node) -> R) -> R {
        let node = &mut self.nodes[id as usize];
        let before = node.heap_bytes();
        let r = f(node);
        self.heap_bytes = self.heap_bytes - before + node.heap_bytes();
        r
    }

    fn add_leaf(&mut self, parent: NodeId, label: &[u32], gid: GroupId, now: u64) {
        let first = label[0];
        let leaf =
            Node { label: label.into(), parent, children: Vec::new(), groups: vec![(gid, now)], last_access: now };
        let id = self.push_node(leaf);
        self.add_tokens(gid, label.len());
        self.edit(parent, |p| {
            let at = p.children.partition_point(|c| c.0 < first);
            push_compact(&mut p.children, at, (first, id));
        });
    }

    /// Cuts `id`'s edge after `at` tokens (0 < at < len): a new node takes the first part and
    /// `id` keeps the rest below it. Returns the new node.
    fn split(&mut self, id: NodeId, at: usize) -> NodeId {
        let old = &self.nodes[id as usize];
        let upper = Node {
            label: old.label[..at].into(),
            parent: old.parent,
            children: vec![(old.label[at], id)],
            groups: old.groups.clone(),
            last_access: old.last_access,
        };
        let parent = old.parent;
        let first = old.label[0];
        let mid = self.push_node(upper);
        self.edit(id, |n| {
            n.label = n.label[at..].into();
            n.parent = mid;
        });
        self.edit(parent, |p| {
            if let Ok(i) = p.children.binary_search_by_key(&first, |c| c.0) {
                p.children[i].1 = mid;
            }
        });
        mid
    }

    fn touch(&mut self, id: NodeId, gid: GroupId, now: u64) {
        let added = self.edit(id, |n| {
            n.last_access = now;
            match n.groups.iter_mut().find(|g| g.0 == gid) {
                Some(entry) => {
                    entry.1 = now;
                    None
                }
                None => {
                    let end = n.groups.len();
                    push_compact(&mut n.groups, end, (gid, now));
                    Some(n.label.len())
                }
            }
        });
        if let Some(len) = added {
            self.add_tokens(gid, len);
        }
    }

    /// Evicts least recently used leaves until the tree is at 90% of the bound (so the next
    /// batch is a tenth of the bound of inserts away), then compacts.
    fn evict(&mut self) {
        let target = self.max_bytes - self.max_bytes / 10;
        // A parent becomes a leaf once all its children are gone; it is pushed then. Its
        // last_access is at least its children's, so the order stays LRU.
        let mut remaining: Vec<usize> = self.nodes.iter().map(|n| n.children.len()).collect();
        let mut heap: BinaryHeap<Reverse<(u64, NodeId)>> = (1..self.nodes.len())
            .filter(|&i| remaining[i] == 0)
            .map(|i| Reverse((self.nodes[i].last_access, i as NodeId)))
            .collect();
        let mut dead = vec![false; self.nodes.len()];
        // Compaction frees the dead nodes' slots and heap, the arena's spare capacity and the
        // parents' child entries; this estimate counts only the first three, so it is an upper
        // bound on what compaction leaves.
        let spare = (self.nodes.capacity() - self.nodes.len()) * size_of::<Node>();
        let mut estimate = self.tree_bytes() - spare;
        while estimate > target {
            let Some(Reverse((_, id))) = heap.pop() else { break };
            let node = &self.nodes[id as usize];
            estimate = estimate.saturating_sub(size_of::<Node>() + node.heap_bytes());
            dead[id as usize] = true;
            let parent = node.parent;
            for &(g, _) in &node.groups {
                if let Some(Some(entry)) = self.groups.get_mut(g as usize) {
                    entry.tokens = entry.tokens.saturating_sub(node.label.len());
                }
            }
            if let Some(r) = remaining.get_mut(parent as usize).filter(|r| **r > 0) {
                *r -= 1;
                if *r == 0 && parent != ROOT {
                    heap.push(Reverse((self.nodes[parent as usize].last_access, parent)));
                }
            }
        }
        self.compact(&dead);
    }

    /// Drops the `dead` nodes (whose parents must be live or dead too), renumbering the rest into
    /// an exactly sized arena and shrinking the child lists that lost entries.
    fn compact(&mut self, dead: &[bool]) {
        let mut new_id = vec![NO_PARENT; self.nodes.len()];
        let mut live = 0;
        for (i, &d) in dead.iter().enumerate() {
            if !d {
                new_id[i] = live;
                live += 1;
            }
        }
        let old = std::mem::take(&mut self.nodes);
        let mut nodes = Vec::with_capacity(live as usize);
        let mut heap_bytes = 0;
        for (i, mut node) in old.into_iter().enumerate() {
            if dead.get(i).copied().unwrap_or(false) {
                continue;
            }
            let before = node.children.len();
            node.children.retain(|&(_, c)| !dead.get(c as usize).copied().unwrap_or(false));
            if node.children.len() != before {
                node.children.shrink_to_fit();
            }
            for child in &mut node.children {
                child.1 = new_id[child.1 as usize];
            }
            if node.parent != NO_PARENT {
                node.parent = new_id[node.parent as usize];
            }
            heap_bytes += node.heap_bytes();
            nodes.push(node);
        }
        self.nodes = nodes;
        self.heap_bytes = heap_bytes;
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Inserts into a Vec growing it by a quarter rather than doubling: most nodes hold one or two
/// groups and children, and the default minimum capacity of four would double their size.
fn push_compact<T>(v: &mut Vec<T>, at: usize, item: T) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 4).max(1));
    }
    v.insert(at.min(v.len()), item);
}

#[cfg(test)]
#[path = "prefix_tree_tests.rs"]
mod tests;
