// `sqlx::migrate!` embeds the migration files at compile time; make cargo rebuild when they change.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
