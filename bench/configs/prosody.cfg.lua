-- Prosody 0.12 (Debian 12) for bench/side-by-side. @DIR@ and @PORT_*@ are
-- filled in by the script; Prosody switches to the prosody user.
pidfile = "@DIR@/prosody.pid"
data_path = "@DIR@/data"
admin_socket = "@DIR@/prosody.sock"
log = { warn = "@DIR@/prosody.log" }
network_backend = "epoll"           -- for many connections
use_libevent = false

interfaces = { "127.0.0.1" }
c2s_ports = { @PORT_C2S@ }          -- STARTTLS, and plain SASL (below)
c2s_direct_tls_ports = { @PORT_TLS@ } -- direct TLS (XEP-0368)
s2s_ports = { }
http_ports = { @PORT_HTTP@ }        -- mod_http loads only with the upload block's component
http_interfaces = { "127.0.0.1" }
https_ports = { }
component_ports = { }

c2s_require_encryption = false      -- SASL on plaintext loopback for --tls none
allow_unencrypted_plain_auth = false
authentication = "internal_hashed"  -- stores StoredKey/ServerKey (SCRAM-SHA-1)
storage = "internal"                -- files; no fsync per write
archive_expires_after = "never"
default_archive_policy = true       -- archive every chat message (mod_mam)

allow_registration = true
min_seconds_between_registrations = 0
registration_throttle_max = 1000000

limits = {
  c2s = { rate = "1000mb/s"; burst = "10s" };
  c2sunauth = { rate = "1000mb/s"; burst = "10s" };
}

modules_enabled = {
  "roster"; "saslauth"; "tls"; "disco"; "ping"; "register"; "posix";
  "smacks"; "mam"; "carbons"; "blocklist"; "limits"; "offline"; "vcard_legacy";
}
modules_disabled = { "s2s" }

certificates = "@DIR@/certs"
ssl = { certificate = "@DIR@/cert.pem"; key = "@DIR@/key.pem" }

VirtualHost "localhost"
  ssl = { certificate = "@DIR@/cert.pem"; key = "@DIR@/key.pem" }

-- group fan-out (XEP-0045). Core mod_muc in 0.12 has no occupant-count or
-- message-rate limit (those are the community mod_muc_limits, not loaded);
-- the generator submits the room configuration form itself (members-only,
-- persistent, non-anonymous, archived); the defaults below say the same.
Component "conference.localhost" "muc"
  modules_enabled = { "muc_mam" }
  restrict_room_creation = false
  muc_room_locking = true                 -- default: locked until configured (201)
  muc_room_default_persistent = true
  muc_room_default_members_only = true
  muc_room_default_public = false
  muc_room_default_public_jids = true     -- non-anonymous
  muc_room_default_history_length = 20
  muc_log_by_default = true               -- archive (mod_muc_mam)
  muc_log_expires_after = "never"
  muc_room_cache_size = 1000              -- rooms kept in memory
  muc_tombstones = false

-- @UPLOAD-BEGIN@ file transfer (XEP-0363); side-by-side keeps this block
-- only for the upload runs. mod_http_file_share: PUT bodies over
-- http_max_content_size (10 MiB) are streamed to a file, smaller ones
-- buffered; files written, never fsynced. Limits raised like natter's.
Component "upload.localhost" "http_file_share"
  http_file_share_size_limit = 2147483648      -- default 10 MiB; the 1 GiB upload
  http_file_share_daily_quota = 1099511627776  -- default 10 x the size limit
  http_file_share_expires_after = 86400
-- @UPLOAD-END@
