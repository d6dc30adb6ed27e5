//! Consume what is in the `examples` queue, confirming each message after handling it.
//!
//! ```sh
//! cargo run -p tern-client --example consume
//! ```

use std::time::Duration;
use tern_client::{Client, ClientConfig, ConsumerOptions};

#[tokio::main]
async fn main() -> Result<(), tern_client::ClientError> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7450".into());
    let client = Client::connect(ClientConfig::new([server])).await?;
    let mut consumer = client
        .consumer("examples", ConsumerOptions::default())
        .await?;
    // Stop after 2 s without a message.
    while let Some(msg) = consumer.next_timeout(Duration::from_secs(2)).await {
        println!(
            "attempt {}: {}",
            msg.attempt,
            String::from_utf8_lossy(&msg.payload)
        );
        consumer.confirm(&msg).await?; // after processing: at-least-once
    }
    let confirmed = consumer.flush_confirms().await;
    println!("{confirmed} confirmed");
    Ok(())
}
