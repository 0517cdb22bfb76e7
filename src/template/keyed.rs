//! Per-key ordering with parallelism across keys.
//!
//! A partition holds many videos. Records of different videos may run at the
//! same time; records of the same video must run one after another, in
//! partition order, because a later record of a video (a replay, a restart)
//! depends on the earlier one. The queue keeps, per active key, the records
//! waiting behind the one that runs.

use std::collections::{HashMap, VecDeque};

/// Waiting records per active key.
#[derive(Debug)]
pub struct KeyedQueue<T> {
    /// A key is present while one of its records runs; the deque holds the
    /// records waiting behind it, oldest first.
    active: HashMap<Vec<u8>, VecDeque<T>>,
    /// Total number of waiting records, for backpressure.
    waiting: usize,
}

impl<T> Default for KeyedQueue<T> {
    fn default() -> Self {
        Self {
            active: HashMap::new(),
            waiting: 0,
        }
    }
}

impl<T> KeyedQueue<T> {
    /// Adds a record. Returns it back when its key is idle: the caller runs
    /// it now. Otherwise it waits for the key's running record to finish.
    pub fn push(&mut self, key: &[u8], item: T) -> Option<T> {
        match self.active.get_mut(key) {
            Some(queue) => {
                queue.push_back(item);
                self.waiting += 1;
                None
            }
            None => {
                self.active.insert(key.to_vec(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The running record of `key` finished: returns the next one to run,
    /// or frees the key.
    pub fn finish(&mut self, key: &[u8]) -> Option<T> {
        let queue = self.active.get_mut(key)?;
        match queue.pop_front() {
            Some(next) => {
                self.waiting -= 1;
                Some(next)
            }
            None => {
                self.active.remove(key);
                None
            }
        }
    }

    /// Records waiting behind a running one.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Keys with a running record.
    pub fn running(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_waits_other_keys_run() {
        let mut q = KeyedQueue::default();
        assert_eq!(q.push(b"a", 1), Some(1));
        assert_eq!(q.push(b"a", 2), None);
        assert_eq!(q.push(b"b", 3), Some(3));
        assert_eq!(q.push(b"a", 4), None);
        assert_eq!((q.waiting(), q.running()), (2, 2));
        assert_eq!(q.finish(b"a"), Some(2));
        assert_eq!(q.finish(b"b"), None);
        assert_eq!(q.finish(b"a"), Some(4));
        assert_eq!(q.finish(b"a"), None);
        assert_eq!((q.waiting(), q.running()), (0, 0));
        // The key is free again.
        assert_eq!(q.push(b"a", 5), Some(5));
    }
}
