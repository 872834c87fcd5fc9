pub mod multipart;
fn main() {}
