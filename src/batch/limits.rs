//! Every limit from Batch's documentation, in one place (see `shared/docs/batch-api.md`).
//! Values marked *unconfirmed* there come from secondary sources; change them here and only here.

use std::time::Duration;

/// `POST /profiles/update`: operations per call.
pub const UPDATE_MAX_OPERATIONS: usize = 200;
/// `POST /profiles/update`: sustained profile updates per second (counted per operation).
pub const UPDATE_RATE_PER_SECOND: u32 = 300;
/// `POST /profiles/update`: burst of profile updates.
pub const UPDATE_BURST: u32 = 1_000;

/// `POST /profiles/mass-update`: operations per call.
pub const MASS_UPDATE_MAX_OPERATIONS: usize = 10_000;
/// `POST /profiles/mass-update`: profile updates per second, no burst beyond one second's worth.
pub const MASS_UPDATE_RATE_PER_SECOND: u32 = 10_000;

/// Attributes in one operation.
pub const MAX_ATTRIBUTES_PER_OPERATION: usize = 50;
/// Length of a `custom_id` *(unconfirmed)*.
pub const MAX_CUSTOM_ID_CHARS: usize = 512;
/// Length of a custom attribute or event name.
pub const MAX_ATTRIBUTE_NAME_CHARS: usize = 30;
/// Length of a string attribute value.
pub const MAX_STRING_VALUE_CHARS: usize = 300;
/// Items in an array-of-strings attribute value.
pub const MAX_ARRAY_ITEMS: usize = 25;
/// Length of a `url(…)` attribute value.
pub const MAX_URL_CHARS: usize = 2_048;
/// Events in one operation *(unconfirmed)*.
pub const MAX_EVENTS_PER_OPERATION: usize = 15;
/// Size of one serialized event *(unconfirmed)*.
pub const MAX_EVENT_BYTES: usize = 25 * 1024;
/// Oldest event time Batch accepts *(unconfirmed for 2.x)*.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(24 * 3600);

/// `POST /audiences/update`: ids per call.
pub const AUDIENCE_UPDATE_MAX_IDS: usize = 10_000;
/// Audience API requests per second *(unconfirmed: "about 1 request per second")*.
pub const AUDIENCE_REQUESTS_PER_SECOND: u32 = 1;
/// A custom audience's name: letters, digits, `_` and `-`.
pub const MAX_AUDIENCE_NAME_CHARS: usize = 255;

/// Native profile attributes; every other attribute is custom and follows `[a-z0-9_]{1,30}`.
pub const NATIVE_ATTRIBUTES: [&str; 7] = [
    "$email_address",
    "$email_marketing",
    "$phone_number",
    "$sms_marketing",
    "$language",
    "$region",
    "$timezone",
];
