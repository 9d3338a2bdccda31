//! DIMSE messages out of an association's P-DATA values, and the answers to them:
//! command fragments assembled (at most [`MAX_COMMAND_BYTES`]), command sets read,
//! each command checked against the presentation context it came on, a C-STORE's
//! data set gathered (at most the object limit, each fragment reserved in the
//! buffered-bytes budget first) and everything else answered at once. Pure: no
//! socket, no core; what an association must do comes back as an [`Event`].

use dicom_core::VR;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::pdu::PDataValue;
use dicom_ul::pdu::PDataValueType;

/// Verification SOP Class (C-ECHO).
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

/// Largest command set taken, bytes. A command set is a few elements (a C-STORE-RQ
/// with two UIDs is about 200 bytes): more is no command, and is never buffered.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Command fields (PS3.7 E.1).
pub(super) mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// Has no response (PS3.7 9.3.2.3).
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    /// Set in every response's command field.
    pub const RESPONSE: u16 = 0x8000;
}

/// Statuses (PS3.4 B.2.3, PS3.7 C).
pub(super) mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP class not supported (or not the presentation context's).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Failure: unrecognized operation (a DIMSE service this node does not provide).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Refused: out of resources (the node is loading, full, or its outbox is);
    /// transient, the sender retries.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATASET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
}

/// A presentation context the association accepted.
#[derive(Debug, Clone)]
pub(super) struct Context {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// A command set's elements that matter here (PS3.7 E.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Command {
    pub field: u16,
    pub message_id: u16,
    /// Affected (or, for N-services, Requested) SOP Class UID.
    pub sop_class: String,
    pub sop_instance: String,
    /// Whether a data set follows (Command Data Set Type other than 0101H).
    pub has_data_set: bool,
}

/// Reads a command set (implicit VR little endian, PS3.7 6.3.1) by walking its
/// elements: every length is checked against what is left before it is used, so
/// no input allocates more than itself or panics. `None`: not a command set.
pub(super) fn parse_command(bytes: &[u8]) -> Option<Command> {
    // (Command Data Set Type is required; absent, no data set is waited for.)
    let mut cmd = Command::default();
    let mut seen_field = false;
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 8 {
            return None;
        }
        let group = u16::from_le_bytes([rest[0], rest[1]]);
        let element = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let value = rest.get(8..8usize.checked_add(len)?)?;
        rest = &rest[8 + len..];
        if group != 0x0000 {
            return None;
        }
        let us = || (value.len() == 2).then(|| u16::from_le_bytes([value[0], value[1]]));
        let uid = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_string()
        };
        match element {
            0x0002 | 0x0003 => cmd.sop_class = uid(),
            0x1000 | 0x1001 => cmd.sop_instance = uid(),
            0x0100 => {
                cmd.field = us()?;
                seen_field = true;
            }
            0x0110 => cmd.message_id = us()?,
            0x0800 => cmd.has_data_set = us()? != 0x0101,
            _ => {}
        }
    }
    seen_field.then_some(cmd)
}

/// A command field's value.
pub(super) enum Field {
    Uid(String),
    Us(u16),
}

/// A command set (implicit VR little endian, with its group length).
pub(super) fn command_set(fields: &[(dicom_core::Tag, Field)]) -> Vec<u8> {
    let obj = InMemDicomObject::command_from_element_iter(fields.iter().map(|(tag, f)| match f {
        Field::Uid(u) => {
            dicom_core::DataElement::new(*tag, VR::UI, dicom_core::PrimitiveValue::from(u.as_str()))
        }
        Field::Us(v) => {
            dicom_core::DataElement::new(*tag, VR::US, dicom_core::PrimitiveValue::from(*v))
        }
    }));
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts)
        .expect("a command set of UIDs and US values can be written");
    out
}

/// The response to `cmd` with `code`: its command field with the response bit, the
/// message it answers, no data set.
pub(super) fn response(cmd: &Command, code: u16) -> Vec<u8> {
    let mut fields = Vec::with_capacity(6);
    if !cmd.sop_class.is_empty() {
        fields.push((
            tags::AFFECTED_SOP_CLASS_UID,
            Field::Uid(cmd.sop_class.clone()),
        ));
    }
    fields.extend([
        (tags::COMMAND_FIELD, Field::Us(cmd.field | field::RESPONSE)),
        (
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            Field::Us(cmd.message_id),
        ),
        (tags::COMMAND_DATA_SET_TYPE, Field::Us(0x0101)),
        (tags::STATUS, Field::Us(code)),
    ]);
    if !cmd.sop_instance.is_empty() {
        fields.push((
            tags::AFFECTED_SOP_INSTANCE_UID,
            Field::Uid(cmd.sop_instance.clone()),
        ));
    }
    command_set(&fields)
}

/// A C-STORE whose data set has arrived whole.
#[derive(Debug)]
pub(super) struct Store {
    pub command: Command,
    pub context: Context,
    pub data: Vec<u8>,
}

/// Why an association is aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AbortReason {
    /// Command fragments past [`MAX_COMMAND_BYTES`].
    CommandTooLarge,
    /// A data set past the object limit.
    ObjectTooLarge,
    /// A P-DATA value out of order: a data set with no command before it, a command
    /// before the last data set ended, fragments of one message on two contexts, or a
    /// presentation context never accepted.
    OutOfOrder,
}

impl AbortReason {
    /// Its label in `cxr_dicom_aborts_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CommandTooLarge => "command_too_large",
            Self::ObjectTooLarge => "object_too_large",
            Self::OutOfOrder => "out_of_order",
        }
    }
}

/// What the association does next.
#[derive(Debug)]
pub(super) enum Event {
    /// Answer with this command set on this context; a C-STORE answered without
    /// analysis carries its `cxr_dicom_stores_total` outcome.
    Respond {
        context: u8,
        command: Vec<u8>,
        outcome: Option<&'static str>,
    },
    /// Analyse this instance, then answer it.
    Store(Store),
    /// A-ABORT.
    Abort(AbortReason),
}

/// What the next data set is for.
enum Pending {
    None,
    /// A C-STORE being gathered.
    Store(Store),
    /// A data set to discard, then this answer (a C-STORE refused before its data
    /// set was taken, an operation not provided here; none: no answer).
    Discard {
        context: u8,
        answer: Vec<u8>,
        outcome: Option<&'static str>,
    },
}

/// An association's messages being assembled.
pub(super) struct Messages {
    contexts: Vec<Context>,
    max_object_bytes: usize,
    command: Vec<u8>,
    command_context: Option<u8>,
    pending: Pending,
}

impl Messages {
    /// Messages on `contexts` (the accepted ones), data sets of at most
    /// `max_object_bytes`.
    pub fn new(contexts: Vec<Context>, max_object_bytes: usize) -> Self {
        Self {
            contexts,
            max_object_bytes,
            command: Vec::new(),
            command_context: None,
            pending: Pending::None,
        }
    }

    /// Bytes held now (command fragments and the data set being gathered).
    pub fn buffered(&self) -> usize {
        self.command.len()
            + match &self.pending {
                Pending::Store(s) => s.data.len(),
                Pending::None | Pending::Discard { .. } => 0,
            }
    }

    /// Takes one P-DATA value. `reserve(n)` is asked before `n` more data-set bytes
    /// are kept; refused, the C-STORE is answered out of resources and the rest of its
    /// data set is discarded.
    pub fn push(&mut self, v: PDataValue, reserve: &mut dyn FnMut(usize) -> bool) -> Option<Event> {
        let Some(context) = self
            .contexts
            .iter()
            .find(|c| c.id == v.presentation_context_id)
            .cloned()
        else {
            return Some(Event::Abort(AbortReason::OutOfOrder));
        };
        match v.value_type {
            PDataValueType::Command => self.on_command_fragment(v, context),
            PDataValueType::Data => self.on_data_fragment(v, &context, reserve),
        }
    }

    fn on_command_fragment(&mut self, v: PDataValue, context: Context) -> Option<Event> {
        if !matches!(self.pending, Pending::None)
            || self.command_context.is_some_and(|c| c != context.id)
        {
            return Some(Event::Abort(AbortReason::OutOfOrder));
        }
        if self.command.len() + v.data.len() > MAX_COMMAND_BYTES {
            self.command = Vec::new();
            return Some(Event::Abort(AbortReason::CommandTooLarge));
        }
        self.command.extend_from_slice(&v.data);
        self.command_context = Some(context.id);
        if !v.is_last {
            return None;
        }
        self.command_context = None;
        let bytes = std::mem::take(&mut self.command);
        let Some(cmd) = parse_command(&bytes) else {
            // Not a command set: nothing to answer it with, nor to know whether a data
            // set follows.
            return Some(Event::Abort(AbortReason::OutOfOrder));
        };
        self.on_command(cmd, context)
    }

    /// A whole command: answered now, or once its data set is in.
    fn on_command(&mut self, cmd: Command, context: Context) -> Option<Event> {
        let refuse = |code, outcome| (Some(response(&cmd, code)), outcome);
        let (answer, outcome) = match cmd.field {
            field::C_ECHO_RQ if context.abstract_syntax == VERIFICATION => {
                refuse(status::SUCCESS, None)
            }
            field::C_STORE_RQ
                if context.abstract_syntax != VERIFICATION
                    && cmd.sop_class == context.abstract_syntax =>
            {
                if !cmd.has_data_set {
                    // A C-STORE without a data set stores nothing.
                    refuse(status::CANNOT_UNDERSTAND, Some("failed"))
                } else {
                    self.pending = Pending::Store(Store {
                        command: cmd,
                        context,
                        data: Vec::new(),
                    });
                    return None;
                }
            }
            // Not the SOP class its presentation context was accepted for.
            field::C_STORE_RQ => refuse(status::SOP_CLASS_NOT_SUPPORTED, Some("failed")),
            field::C_ECHO_RQ => refuse(status::SOP_CLASS_NOT_SUPPORTED, None),
            // Responses the peer has no business sending, and a cancel: no answer.
            f if f & field::RESPONSE != 0 || f == field::C_CANCEL_RQ => (None, None),
            // C-FIND, C-GET, C-MOVE, the N-services: not provided here.
            _ => refuse(status::UNRECOGNIZED_OPERATION, None),
        };
        if cmd.has_data_set {
            self.pending = Pending::Discard {
                context: context.id,
                answer: answer.unwrap_or_default(),
                outcome,
            };
            return None;
        }
        answer.map(|command| Event::Respond {
            context: context.id,
            command,
            outcome,
        })
    }

    fn on_data_fragment(
        &mut self,
        v: PDataValue,
        context: &Context,
        reserve: &mut dyn FnMut(usize) -> bool,
    ) -> Option<Event> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => Some(Event::Abort(AbortReason::OutOfOrder)),
            Pending::Discard { context: c, .. } if c != context.id => {
                Some(Event::Abort(AbortReason::OutOfOrder))
            }
            Pending::Discard {
                context,
                answer,
                outcome,
            } => {
                if !v.is_last {
                    self.pending = Pending::Discard {
                        context,
                        answer,
                        outcome,
                    };
                    return None;
                }
                (!answer.is_empty()).then_some(Event::Respond {
                    context,
                    command: answer,
                    outcome,
                })
            }
            Pending::Store(s) if s.context.id != context.id => {
                Some(Event::Abort(AbortReason::OutOfOrder))
            }
            Pending::Store(mut s) => {
                if s.data.len() + v.data.len() > self.max_object_bytes {
                    return Some(Event::Abort(AbortReason::ObjectTooLarge));
                }
                if !reserve(v.data.len()) {
                    // Out of buffer: answered out of resources (the sender retries),
                    // the rest of the data set read and dropped.
                    self.pending = Pending::Discard {
                        context: context.id,
                        answer: response(&s.command, status::OUT_OF_RESOURCES),
                        outcome: Some("busy"),
                    };
                    return self.on_data_fragment(v, context, reserve);
                }
                s.data.extend_from_slice(&v.data);
                if v.is_last {
                    return Some(Event::Store(s));
                }
                self.pending = Pending::Store(s);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CR: &str = "1.2.840.10008.5.1.4.1.1.1";
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn contexts() -> Vec<Context> {
        vec![
            Context {
                id: 1,
                abstract_syntax: VERIFICATION.into(),
                transfer_syntax: "1.2.840.10008.1.2".into(),
            },
            Context {
                id: 3,
                abstract_syntax: CR.into(),
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
            },
        ]
    }

    fn rq(field: u16, sop_class: &str, data_set: bool) -> Vec<u8> {
        command_set(&[
            (tags::AFFECTED_SOP_CLASS_UID, Field::Uid(sop_class.into())),
            (tags::COMMAND_FIELD, Field::Us(field)),
            (tags::MESSAGE_ID, Field::Us(7)),
            (
                tags::COMMAND_DATA_SET_TYPE,
                Field::Us(if data_set { 0x0000 } else { 0x0101 }),
            ),
            (tags::AFFECTED_SOP_INSTANCE_UID, Field::Uid("1.2.3".into())),
        ])
    }

    fn pdv(context: u8, command: bool, is_last: bool, data: Vec<u8>) -> PDataValue {
        PDataValue {
            presentation_context_id: context,
            value_type: if command {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last,
            data,
        }
    }

    fn answered(e: Option<Event>) -> (u8, Command) {
        match e {
            Some(Event::Respond {
                context, command, ..
            }) => (context, parse_command(&command).expect("a command set")),
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn a_command_set_written_is_read_back() {
        let c = parse_command(&rq(field::C_STORE_RQ, CR, true)).unwrap();
        assert_eq!(c.field, field::C_STORE_RQ);
        assert_eq!(c.message_id, 7);
        assert_eq!(c.sop_class, CR);
        assert_eq!(c.sop_instance, "1.2.3");
        assert!(c.has_data_set);
        assert!(parse_command(&[0u8; 7]).is_none());
        // An element longer than what is left.
        assert!(parse_command(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0]).is_none());
    }

    #[test]
    fn command_fragments_past_the_cap_abort_without_growing_past_it() {
        let mut m = Messages::new(contexts(), 1 << 20);
        let mut yes = |_| true;
        let chunk = vec![0u8; 16 * 1024];
        for _ in 0..4 {
            assert!(
                m.push(pdv(1, true, false, chunk.clone()), &mut yes)
                    .is_none()
            );
        }
        assert_eq!(m.buffered(), MAX_COMMAND_BYTES);
        let e = m.push(pdv(1, true, false, vec![0u8; 1]), &mut yes);
        assert!(matches!(
            e,
            Some(Event::Abort(AbortReason::CommandTooLarge))
        ));
        assert_eq!(m.buffered(), 0);
    }

    #[test]
    fn a_store_of_another_sop_class_than_its_context_is_refused_unread() {
        let mut m = Messages::new(contexts(), 1 << 20);
        let mut asked = 0usize;
        let mut reserve = |n| {
            asked += n;
            true
        };
        let store = rq(field::C_STORE_RQ, CT, true);
        assert!(m.push(pdv(3, true, true, store), &mut reserve).is_none());
        assert!(
            m.push(pdv(3, false, false, vec![1; 100]), &mut reserve)
                .is_none()
        );
        assert_eq!(m.buffered(), 0);
        match m.push(pdv(3, false, true, vec![1; 100]), &mut reserve) {
            Some(Event::Respond {
                context,
                command,
                outcome,
            }) => {
                assert_eq!(context, 3);
                assert_eq!(parse_command(&command).unwrap().field, 0x8001);
                assert_eq!(status_of(&command), status::SOP_CLASS_NOT_SUPPORTED);
                assert_eq!(outcome, Some("failed"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(asked, 0);
    }

    fn status_of(command: &[u8]) -> u16 {
        let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj = InMemDicomObject::read_dataset_with_ts(command, &ts).unwrap();
        obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap()
    }

    #[test]
    fn a_c_find_is_answered_at_once_as_an_unrecognized_operation() {
        let mut m = Messages::new(contexts(), 1 << 20);
        let mut yes = |_| true;
        // Its identifier follows: read and dropped, then the answer.
        assert!(
            m.push(pdv(3, true, true, rq(0x0020, CR, true)), &mut yes)
                .is_none()
        );
        match m.push(pdv(3, false, true, vec![0; 10]), &mut yes) {
            Some(Event::Respond { command, .. }) => {
                let c = parse_command(&command).unwrap();
                assert_eq!(c.field, 0x8020);
                assert_eq!(status_of(&command), status::UNRECOGNIZED_OPERATION);
            }
            other => panic!("{other:?}"),
        }
        // An N-ACTION with no data set: at once.
        let (_, c) = answered(m.push(pdv(1, true, true, rq(0x0130, CR, false)), &mut yes));
        assert_eq!(c.field, 0x8130);
    }

    #[test]
    fn a_store_out_of_buffer_is_answered_out_of_resources() {
        let mut m = Messages::new(contexts(), 1 << 20);
        let mut budget = 150usize;
        let mut reserve = |n: usize| {
            if n > budget {
                return false;
            }
            budget -= n;
            true
        };
        m.push(
            pdv(3, true, true, rq(field::C_STORE_RQ, CR, true)),
            &mut reserve,
        );
        assert!(
            m.push(pdv(3, false, false, vec![1; 100]), &mut reserve)
                .is_none()
        );
        assert_eq!(m.buffered(), 100);
        assert!(
            m.push(pdv(3, false, false, vec![1; 100]), &mut reserve)
                .is_none()
        );
        assert_eq!(m.buffered(), 0);
        match m.push(pdv(3, false, true, vec![1; 100]), &mut reserve) {
            Some(Event::Respond {
                command, outcome, ..
            }) => {
                assert_eq!(status_of(&command), status::OUT_OF_RESOURCES);
                assert_eq!(outcome, Some("busy"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_store_on_its_context_is_gathered_whole() {
        let mut m = Messages::new(contexts(), 1 << 20);
        let mut yes = |_| true;
        m.push(
            pdv(3, true, true, rq(field::C_STORE_RQ, CR, true)),
            &mut yes,
        );
        m.push(pdv(3, false, false, vec![1; 10]), &mut yes);
        match m.push(pdv(3, false, true, vec![2; 10]), &mut yes) {
            Some(Event::Store(s)) => {
                assert_eq!(s.data.len(), 20);
                assert_eq!(s.context.transfer_syntax, "1.2.840.10008.1.2.1");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A P-DATA value: a context (accepted or not), a kind, a last flag, and bytes
    /// that are sometimes a real command set.
    fn any_pdv() -> impl Strategy<Value = PDataValue> {
        let data = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            (0usize..40_000).prop_map(|n| vec![0u8; n]),
            (
                prop::sample::select(vec![0x0001u16, 0x0030, 0x0020, 0x0021, 0x8001, 0x0FFF]),
                prop::sample::select(vec![CR, CT, VERIFICATION, ""]),
                any::<bool>()
            )
                .prop_map(|(f, c, d)| rq(f, c, d)),
        ];
        (
            prop::sample::select(vec![1u8, 3, 5]),
            any::<bool>(),
            any::<bool>(),
            data,
        )
            .prop_map(|(c, cmd, last, data)| pdv(c, cmd, last, data))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes as a command set: no panic, nothing read past them.
        #[test]
        fn any_bytes_parse_or_not_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_command(&bytes);
        }

        /// Any sequence of P-DATA values: no panic; what is held never exceeds the
        /// command cap plus the object limit, nor what the budget granted; once
        /// aborted, the association is gone.
        #[test]
        fn any_pdata_stays_bounded(values in prop::collection::vec(any_pdv(), 0..60)) {
            let max_object = 50_000;
            let mut m = Messages::new(contexts(), max_object);
            let budget = 60_000usize;
            let mut granted = 0usize;
            for v in values {
                let mut reserve = |n: usize| {
                    if granted + n > budget {
                        return false;
                    }
                    granted += n;
                    true
                };
                let e = m.push(v, &mut reserve);
                prop_assert!(m.command.len() <= MAX_COMMAND_BYTES);
                prop_assert!(m.buffered() <= MAX_COMMAND_BYTES + max_object);
                if let Pending::Store(s) = &m.pending {
                    prop_assert!(s.data.len() <= granted);
                }
                if m.buffered() == 0 {
                    granted = 0;
                }
                if matches!(e, Some(Event::Abort(_))) {
                    break;
                }
            }
        }
    }
}
