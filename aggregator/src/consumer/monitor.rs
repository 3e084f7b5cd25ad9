//! The queue monitor of one session: the votes queue's depth and the unexplained
//! dead-letter queue's, read on a channel of its own into the metrics.

use std::time::Duration;

use lapin::Channel;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

use super::Ctx;
use crate::broker::{self, Session};

/// Every 2 s, reads the votes queue's depth and the number of messages the broker
/// dead-lettered without a reason (see [`broker::unexplained_queue`]) into the metrics,
/// on a channel of its own so a failure there cannot touch the acks. Warns when
/// unexplained dead letters appear: they may be valid votes that were never counted.
pub(super) async fn spawn_queue_monitor(ctx: &Ctx, session: &Session, stop: CancellationToken) {
    let Ok(channel) = session.connection.create_channel().await else {
        return;
    };
    tokio::spawn(monitor_loop(ctx.clone(), channel, session.node.clone(), stop).in_current_span());
}

/// Every 2 s until `stop`: the queue's depth and the unexplained dead letters' count into
/// the metrics, and a warning when the latter grows. Ends when the channel fails.
async fn monitor_loop(ctx: Ctx, channel: Channel, node: broker::Node, stop: CancellationToken) {
    let unexplained = broker::unexplained_queue(&ctx.config.queue_name);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let depth = broker::message_count(&channel, &node, &ctx.config.queue_name).await;
        let odd = broker::message_count(&channel, &node, &unexplained).await;
        let (Ok(depth), Ok(odd)) = (depth, odd) else {
            break;
        };
        ctx.metrics.queue_depth.set(i64::from(depth));
        let before = ctx.metrics.dead_letters_unexplained.get();
        ctx.metrics.dead_letters_unexplained.set(i64::from(odd));
        if i64::from(odd) > before {
            warn!(
                queue = %unexplained,
                messages = odd,
                "the broker dead-lettered messages without a reason (TTL, a delivery-limit \
                 policy, a reject); they may be valid votes that were NOT counted: inspect \
                 them and move them back to the votes queue (the vote UUID makes recounting safe)"
            );
        }
    }
}
