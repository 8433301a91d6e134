//! The protobuf codec of every qwen-serve service: prost's, except that a request body that does
//! not decode is the caller's fault, so it is INVALID_ARGUMENT rather than the INTERNAL that
//! tonic-prost reports, and a client can tell its bug from a server fault.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct QwenCodec<T, U> {
    inner: ProstCodec<T, U>,
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for QwenCodec<T, U> {
    fn default() -> Self {
        QwenCodec { inner: ProstCodec::default(), _pd: PhantomData }
    }
}

impl<T, U> Codec for QwenCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = QwenEncoder<T>;
    type Decoder = QwenDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        QwenEncoder(self.inner.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        QwenDecoder(self.inner.decoder())
    }
}

pub struct QwenEncoder<T>(ProstEncoder<T>);

pub struct QwenDecoder<U>(ProstDecoder<U>);

impl<T: Message> Encoder for QwenEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, dst)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

impl<U: Message + Default> Decoder for QwenDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(|s| Status::invalid_argument(format!("malformed request: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
