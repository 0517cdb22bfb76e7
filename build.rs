//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds
//! the files of `migrations/`, and cargo does not notice a new file there
//! by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
