//! What `/proc` says about local processes: which ones hold a TCP socket
//! listening on a port (the app behind an upstream URL). Only processes this
//! user may inspect are seen (all of them for root).

/// The pids of the processes holding a socket that listens on TCP `port`
/// (IPv4 or IPv6), in `/proc` order; empty if none is visible.
pub(crate) fn listening_pids(port: u16) -> Vec<u32> {
    let inodes: Vec<String> = listening_inodes(port)
        .into_iter()
        .map(|i| format!("socket:[{i}]"))
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .is_some_and(|l| l.to_str().is_some_and(|l| inodes.iter().any(|i| i == l)))
        });
        if owns {
            pids.push(pid);
        }
    }
    pids
}

/// Whether anything listens on TCP `port` (whoever owns it).
pub(crate) fn is_listening(port: u16) -> bool {
    !listening_inodes(port).is_empty()
}

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Ok(inode) = f[9].parse::<u64>() {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_found_listening_where_it_binds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(is_listening(port));
        assert_eq!(listening_pids(port), vec![std::process::id()]);
        drop(l);
        assert!(listening_pids(port).is_empty());
    }
}
