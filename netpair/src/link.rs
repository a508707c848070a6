//! Link state from the kernel: rtnetlink link notifications (multicast group RTNLGRP_LINK),
//! not polling sysfs. Carrier means IFF_UP and IFF_LOWER_UP.

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
};
use tokio::sync::mpsc;

use crate::Error;

/// One interface's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub carrier: bool,
}

fn state_of(msg: &LinkMessage) -> Option<LinkState> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let f = msg.header.flags;
    Some(LinkState {
        name,
        carrier: f.contains(LinkFlags::Up) && f.contains(LinkFlags::LowerUp),
    })
}

/// Subscribes to link notifications, then reads the current state of every link.
/// Returns that state and a channel of later changes (deleted links arrive with carrier
/// false). Must run inside a tokio runtime; the netlink connection lives in a spawned task.
pub async fn watch() -> Result<(Vec<LinkState>, mpsc::UnboundedReceiver<LinkState>), Error> {
    let (conn, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(|source| Error::Io {
            what: "rtnetlink multicast socket".into(),
            source,
        })?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let change = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => state_of(&l),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    state_of(&l).map(|s| LinkState { carrier: false, ..s })
                }
                _ => None,
            };
            if let Some(s) = change
                && tx.send(s).is_err()
            {
                break;
            }
        }
    });
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::Io {
            what: "rtnetlink link dump".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((links.iter().filter_map(state_of).collect(), rx))
}
