//! Produce 10 messages and wait for every ACK.
//!
//! ```sh
//! cargo run --release -- server &                      # a broker on 127.0.0.1:7450
//! cargo run -p tern-client --example produce
//! ```

use tern_client::{guid_hex, Client, ClientConfig, OutMessage, Status};

#[tokio::main]
async fn main() -> Result<(), tern_client::ClientError> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7450".into());
    let client = Client::connect(ClientConfig::new([server])).await?;
    let producer = client.producer("examples").await?;
    // Send all ten first (pipelined), then collect the ACKs.
    let mut pending = Vec::new();
    for i in 0..10 {
        pending.push(
            producer
                .send(OutMessage::new(format!("hello #{i}")))
                .await?,
        );
    }
    for handle in pending {
        let result = handle.await;
        println!("{} {}", guid_hex(&result.guid), result.status);
        if result.status != Status::Ok {
            // `timeout` means unknown: retry with the same GUID (send_with_guid) to learn the outcome.
            eprintln!("not stored: {}", result.status);
        }
    }
    Ok(())
}
